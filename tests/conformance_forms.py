"""Odd export forms users bring, built from :mod:`conformance_models`' random-weight HF models.

* ``torchscript17``: the legacy TorchScript exporter (``dynamo=False``) at opset 17, dynamic sequence axis;
* ``opset18``: the dynamo exporter at opset 18;
* ``batch``: dynamic batch and sequence axes (evaluated on batches of 2);
* ``subfolder``: external data in a subfolder (``weights/model.data``), loaded from another directory;
* ``cond``: the LM head inside both branches of an ``If`` (``torch.cond`` on the sequence length), the
  head's weight read from the outer scope (decoders);
* ``loop``: the same head inside a ``Loop`` body (trip count 1, the logits its scan output), made from the
  dynamo export by graph surgery (decoders);
* ``qdq``: an already-quantized model (ONNX Runtime's ``quantize_static``, QDQ format).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

import conformance_models as cm

__all__ = ["ODD_FORMS", "export_odd", "batched"]

ODD_FORMS = ("torchscript17", "opset18", "batch", "subfolder", "cond", "loop", "qdq")


def _cond_module(arch: str):
    import torch

    full = cm.build_module(arch)

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = getattr(full, "model", None) or full.transformer  # GPT-2 names its body transformer
            self.head = full.lm_head

        def forward(self, input_ids):
            h = self.base(input_ids=input_ids, use_cache=False).last_hidden_state
            return torch.cond(input_ids.shape[1] > 8, lambda x: self.head(x), lambda x: self.head(x * 0.5) * 2.0,
                              (h,))

    return Cond().eval()


def export_odd(arch: str, form: str, folder: Path) -> Path:
    import onnx
    import pytest
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if form == "qdq":
        return _qdq(arch, folder)
    if form in ("cond", "loop") and arch in cm.ENCODERS:
        pytest.skip(f"the {form} form puts a decoder's LM head in a control-flow subgraph")
    if form == "loop":
        return _loop(arch, folder)
    module = _cond_module(arch) if form == "cond" else cm._wrap(cm.build_module(arch), arch)
    ids = torch.randint(0, cm.VOCAB, (2 if form == "batch" else 1, cm.SEQ))
    seq = torch.export.Dim("seq", min=2, max=cm.POSITIONS - 2)
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: seq} if form == "batch" else {1: seq}
    path = folder / f"{arch}_{form}.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if form == "torchscript17":
                torch.onnx.export(module, (ids,), str(path), dynamo=False, opset_version=17,
                                  input_names=["input_ids"], output_names=["output"],
                                  dynamic_axes={"input_ids": {1: "seq"}, "output": {1: "seq"}})
                return path
            program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=18 if form == "opset18" else None,
                                        input_names=["input_ids"], output_names=["output"],
                                        dynamic_shapes={"input_ids": dims})
        except Exception as exc:
            pytest.skip(f"{form} export of {arch} failed in torch's exporter: {type(exc).__name__}")
    if form != "subfolder":
        program.save(str(path), external_data=False)
        return path
    proto = program.model_proto
    (folder / "weights").mkdir()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights/model.data")
    return path


def _loop(arch: str, folder: Path) -> Path:
    """The dynamo export with its last MatMul (the LM head) moved into a Loop body run once."""
    import onnx
    from onnx import TensorProto, helper

    src = cm.export(arch, "dynamo", folder / "float")
    model = onnx.load(str(src))
    nodes = list(model.graph.node)
    head = [i for i, n in enumerate(nodes) if n.op_type == "MatMul"][-1]
    mm = nodes[head]
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", list(mm.input), ["y"], name="loop_body_lm_head")],
        "loop_body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                      helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    trip = helper.make_tensor("loop_trips", TensorProto.INT64, [], [1])
    go = helper.make_tensor("loop_go", TensorProto.BOOL, [], [True])
    axis = helper.make_tensor("loop_axis", TensorProto.INT64, [1], [0])
    model.graph.initializer.extend([trip, go, axis])
    loop = helper.make_node("Loop", ["loop_trips", "loop_go"], ["loop_scan"], name="lm_head_loop", body=body)
    squeeze = helper.make_node("Squeeze", ["loop_scan", "loop_axis"], [mm.output[0]], name="lm_head_squeeze")
    del model.graph.node[head]
    model.graph.node.insert(head, squeeze)
    model.graph.node.insert(head, loop)
    path = folder / f"{arch}_loop.onnx"
    onnx.save(model, str(path))
    return path


def _qdq(arch: str, folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    src = cm.export(arch, "dynamo", folder / "float")
    feeds = cm.feeds(src, 4, seed=0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    path = folder / f"{arch}_qdq.onnx"
    quantize_static(str(src), str(path), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"])
    return path


def batched(feeds: list[dict]) -> list[dict]:
    """Pairs of single-sequence feeds stacked into batches of 2 (same length, so no padding)."""
    return [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(feeds[::2], feeds[1::2])]
