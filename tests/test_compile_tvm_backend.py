"""``lowbit compile --backend tvm``: the recipe's ORT lowering is not run (``lower-ort`` dropped, the integer
ops kept by ``lower-lowbit``), so ``lower-tvm`` compiles lowbit's integer ops to its own kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.api.driver import tvm_pipeline
from lowbit.backends.lower_lowbit import LowerLowbit
from lowbit.passmanager.pipeline import parse_pipeline
from lowbit.passmanager.recipes import RECIPES


def _items(text):
    return {i.name: dict(i.options) for i in parse_pipeline(text)}


def test_tvm_pipeline_drops_the_ort_lowering():
    items = _items(tvm_pipeline(RECIPES["int8-integer-only"]))
    assert "lower-ort" not in items and list(items)[-1] == "lower-tvm"
    assert set(items["lower-lowbit"]["keep"].split("+")) == {"Requantize", "Lookup", "IntNorm", "IntSoftmax"}
    assert "lower-ort" not in _items(tvm_pipeline(RECIPES["w8a8"])) and list(_items(tvm_pipeline("w8a8")))[-1] == "lower-tvm"
    given = tvm_pipeline("quantize,lower-lowbit{keep=Hadamard},lower-tvm{shapes=tokens:1x8}")
    assert given.count("lower-tvm") == 1 and _items(given)["lower-tvm"] == {"shapes": "tokens:1x8"}
    assert _items(given)["lower-lowbit"]["keep"].split("+")[0] == "Hadamard"  # the user's own keep stays


def _requantize_lookup() -> ir.Model:
    inits = {"b": np.asarray(3, np.int64), "c": np.asarray(4, np.int64), "zp": np.asarray(0, np.int8),
             "table": np.arange(256, dtype=np.int16)[::-1].copy()}
    nodes = [helper.make_node("Requantize", ["x", "b", "c", "zp"], ["y"], domain="lowbit", name="rq"),
             helper.make_node("Lookup", ["y", "table"], ["z"], domain="lowbit", name="lut")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT32, [4])],
                              [helper.make_tensor_value_info("z", TensorProto.INT16, [4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lowbit", 1)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def test_lower_lowbit_keeps_the_named_ops():
    from lowbit.passmanager.manager import CompileContext, PassManager

    m = PassManager.from_pipeline("lower-lowbit{keep=Lookup}", CompileContext(show_progress=False)).run(_requantize_lookup())
    assert [(n.domain, n.op_type) for n in m.graph if n.domain == "lowbit"] == [("lowbit", "Lookup")]
    assert "lowbit" in m.opset_imports  # still needed by the kept op
    with pytest.raises(ValueError, match="Softmax"):
        LowerLowbit.Options(keep="Lookup+Softmax")


@pytest.mark.slow  # one TVM build of a tiny integer-only Llama: ≈30 s on 2 shared cores
def test_compile_backend_tvm_compiles_the_integer_ops(tmp_path):
    import lowbit
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
    from lowbit.ir.sessions import make_session
    from lowbit.runtime.tvm_runner import TvmSession

    cfg = LlamaConfig(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)
    rng = np.random.default_rng(0)
    calib = [{"tokens": rng.integers(0, 64, (1, 16)).astype(np.int64)} for _ in range(8)]
    recipe = f"int8-integer-only,lower-tvm{{shapes=tokens:1x16,out_dir={tmp_path}/tvm}}"
    res = lowbit.compile(build_llama(cfg, random_llama_weights(cfg, 0)), recipe, calibration=calib, backend="tvm",
                         calibration_samples=None, progress=False)
    assert "lower-ort" not in res.pipeline and "lower-lowbit{keep=" in res.pipeline
    assert any(n.domain == "lowbit" and n.op_type == "Requantize" for n in res.model.graph)  # reached lower-tvm
    meta, lib = json.loads(open(res.report["tvm"]["meta"]).read()), res.report["tvm"]["lib"]
    assert meta["prepare"]["requantize_fused"] > 0  # the GEMMs' requantizes ran in TVM's kernel epilogues
    lowered = ir.serde.deserialize_model(ir.serde.serialize_model(res.model))
    LowerLowbit()(lowered)
    probe = {"tokens": rng.integers(0, 64, (1, 16)).astype(np.int64)}
    want = make_session(lowered).run(None, probe)
    got = TvmSession(lib).run(None, probe)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
