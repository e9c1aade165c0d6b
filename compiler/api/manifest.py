"""Device manifest of an integer-only graph (what ``lowbit export`` writes beside the .onnx).

Format ``lowbit-integer-manifest`` version 1, one JSON object:

``format``, ``version``      "lowbit-integer-manifest", 1
``model``                    the .onnx file name beside the manifest (same folder)
``pipeline``                 the pipeline string that produced it
``opsets``                   {domain: version}; domain "lowbit" holds lowbit's own ops
``ops``                      {op: count} over the integer regions (a device runtime must implement these
                             with the integer semantics of ``lowbit.runtime.reference``; "lowbit.Requantize"
                             is ``sat(floor((acc·b + 2^(c−1)) / 2^c) + zero_point)``)
``stays_float``              {op: count} of float ops between the regions (the float boundaries)
``quantizers``               float → integer entries: {"node", "input", "output", "dtype", "bits",
                             "unit_step" (true when migrate-steps moved the step into the producer),
                             "step" (scalar or per-channel list, float32), "zero_point" (list)}
``gemms``                    {"node", "weight" (int8 initializer [K, N]), "K", "N", "act_bits": 8,
                             "weight_bits": 8, "accumulator_bound" (max |acc| the proof allows)}
``requantize``               {"node", "input", "output", "out_dtype", "out_bits", "scales": [[b, c], ...]
                             (one pair per output channel, or one for all), "zero_point", "out_step"
                             (float32 step the following DequantizeLinear uses)}
``float_boundaries``         names of the integer → float nodes (DequantizeLinear)

Every number a device needs is also an initializer in the .onnx; the manifest is the index.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from lowbit.ir.integer_check import check_integer_regions
from lowbit.ops.registry import DOMAIN

__all__ = ["build_manifest", "MANIFEST_FORMAT", "MANIFEST_VERSION"]

MANIFEST_FORMAT = "lowbit-integer-manifest"
MANIFEST_VERSION = 1


def _arr(v: ir.Value | None):
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _list(a: np.ndarray):
    return a.reshape(-1).tolist() if a.size > 1 else a.reshape(-1)[0].item()


def _round_and_clip_params(cast: ir.Node):
    """Walk Cast ← Clip ← Add(zp) ← Round ← [Mul(1/step)] ← x back to (x, step, zp)."""
    clip = cast.inputs[0].producer()
    add = clip.inputs[0].producer() if clip is not None and clip.op_type == "Clip" else None
    rnd = add.inputs[0].producer() if add is not None and add.op_type == "Add" else None
    if rnd is None or rnd.op_type != "Round":
        return None
    zp = _arr(add.inputs[1]).astype(np.uint8)
    x, step = rnd.inputs[0], np.ones(zp.shape, np.float32)
    mul = x.producer()
    if mul is not None and mul.op_type == "Mul" and _arr(mul.inputs[1]) is not None:
        x, step = mul.inputs[0], (1.0 / _arr(mul.inputs[1])).astype(np.float32)
    return x, step, zp


def build_manifest(model: ir.Model, model_file: str, pipeline: str = "") -> dict:
    rep = check_integer_regions(model)
    ops = Counter()
    quantizers, gemms, requant, exits = [], [], [], []
    for region in rep.regions:
        ops.update(region.ops)
        exits += [e.name for e in region.exits]
        for q in region.entries:
            if any(e["node"] == q.name for e in quantizers):
                continue
            if q.op_type == "Cast":  # migrate-steps' round-and-clip: Round → Add(zp) → Clip → Cast
                chain = _round_and_clip_params(q)
                if chain is None:
                    continue
                x, step, zp = chain
            else:
                x, step, zp = q.inputs[0], _arr(q.inputs[1]), _arr(q.inputs[2])
            quantizers.append({"node": q.name, "input": x.name, "output": q.outputs[0].name,
                               "dtype": str(zp.dtype), "bits": int(zp.dtype.itemsize * 8),
                               "unit_step": bool(np.all(step == 1)), "step": _list(step.astype(np.float32)),
                               "zero_point": _list(zp)})
        for n in region.nodes:
            if n.op_type == "MatMulInteger":
                w = _arr(n.inputs[1])
                acc_bound = int(255 * np.abs(w.astype(np.int64)).sum(axis=0).max())
                gemms.append({"node": n.name, "weight": n.inputs[1].name, "K": int(w.shape[0]), "N": int(w.shape[1]),
                              "act_bits": 8, "weight_bits": 8, "accumulator_bound": acc_bound})
            elif n.domain == DOMAIN and n.op_type == "Requantize":
                b, c, zp = (_arr(v) for v in n.inputs[1:4])
                pairs = [[int(x), int(y)] for x, y in zip(*np.broadcast_arrays(b.reshape(-1), c.reshape(-1)))]
                dq = next((u.node for u in n.outputs[0].uses() if u.node.op_type == "DequantizeLinear"), None)
                requant.append({"node": n.name, "input": n.inputs[0].name, "output": n.outputs[0].name,
                                "out_dtype": str(zp.dtype), "out_bits": int(zp.dtype.itemsize * 8), "scales": pairs,
                                "zero_point": int(zp.reshape(-1)[0]),
                                "out_step": None if dq is None else float(_arr(dq.inputs[1]).reshape(-1)[0])})
    stays = rep.float_ops
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": model_file, "pipeline": pipeline,
            "opsets": dict(model.opset_imports), "ops": dict(ops), "stays_float": dict(stays),
            "integer_regions": len(rep.regions), "quantizers": quantizers, "gemms": gemms, "requantize": requant,
            "float_boundaries": exits}
