"""lower-tvm on integer graphs: every lowbit integer op and the fused int8 GEMM + requantize, bit for bit
against the numpy references (which compute with exact integers: math.isqrt, int64 shifts).

A small graph of realistic widths (random codes, dyadic scales from ``dyadic``) holds each op in each
form the recipes emit: per-channel Requantize after a GEMM with an int32 offset (fused into the GEMM's
epilogue), a scalar Requantize after an Add, per-channel Lookup, LayerNorm and RMSNorm IntNorm, and
IntSoftmax with a mask.  The real models are checked in ``test_integer_only.py`` (slow).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.ops.integer_nonlinear import exp_table
from lowbit.ops.integer_ops import dyadic

pytest.importorskip("tvm")

S, K, N = 14, 64, 96  # N is not a multiple of the kernel's 64-column tile


def _graph(rng) -> ir.Model:
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    b, c, _ = dyadic(rng.uniform(3e-4, 5e-4, N))
    b2, c2, _ = dyadic(np.array([0.011]))
    inits = {
        "W": w, "offset": rng.integers(-3000, 3000, N).astype(np.int32),
        "b": b, "c": c, "zp": np.asarray(128, np.uint8),
        "table": rng.integers(-3000, 3000, (N, 256)).astype(np.int16),
        "b2": b2.reshape(()), "c2": c2.reshape(()), "zp2": np.asarray(-3, np.int8),
        "zx": np.asarray(0, np.int16), "g": rng.integers(1 << 19, 1 << 21, N).astype(np.int64),
        "beta": rng.integers(-(1 << 42), 1 << 42, N).astype(np.int64), "zp3": np.asarray(128, np.uint8),
        "zx8": np.asarray(120, np.uint8), "g8": rng.integers(1 << 20, 1 << 21, N).astype(np.int64),
        "beta8": np.zeros(N, np.int64), "zp8": np.asarray(0, np.int8),
        "exp": exp_table(0.2), "shift": np.asarray(9, np.int32),
    }
    L = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], domain="lowbit", name=out, **kw)  # noqa: E731
    nodes = [
        helper.make_node("MatMulInteger", ["x", "W"], ["acc"], name="mm"),
        helper.make_node("Add", ["acc", "offset"], ["acc_off"], name="off"),
        L("Requantize", ["acc_off", "b", "c", "zp"], "y1"),                       # fused into the GEMM
        L("Lookup", ["y1", "table"], "y2"),                                       # int16 per channel
        L("IntNorm", ["y2", "zx", "g", "beta", "zp3"], "y3", rms=0, frac_bits=20, shift=36, n_min=1),
        L("IntNorm", ["y1", "zx8", "g8", "beta8", "zp8"], "y4", rms=1, frac_bits=20, shift=36, n_min=1),
        helper.make_node("Cast", ["y2"], ["y2_32"], to=TensorProto.INT32, name="cast"),
        helper.make_node("Cast", ["y1"], ["y1_32"], to=TensorProto.INT32, name="cast1"),
        helper.make_node("Add", ["y2_32", "y1_32"], ["sum"], name="add"),
        L("Requantize", ["sum", "b2", "c2", "zp2"], "y5"),                       # scalar b, c: element-wise
        L("IntSoftmax", ["y5", "exp", "keep"], "y6"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="xt"),  # attention-like: both at run time
        helper.make_node("MatMulInteger", ["x", "xt", "zx8", "zp3"], ["xx"], name="xx"),
        L("Requantize", ["xx", "b2", "c2", "zp2"], "y7"),
    ]
    graph = helper.make_graph(
        nodes, "integer_ops",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, S, K]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, N])],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("y3", TensorProto.UINT8), ("y4", TensorProto.INT8), ("y6", TensorProto.UINT8), ("y7", TensorProto.INT8))],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lowbit", 1)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


@pytest.mark.slow  # one TVM build: ≈30 s on 2 shared cores
def test_every_integer_op_bit_exact_on_tvm(tmp_path):
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    rng = np.random.default_rng(0)
    model = _graph(rng)
    feeds = []
    for i in range(4):
        keep = rng.random((1, 1, N)) < 0.8
        keep[..., :3] = True
        feeds.append({"x": rng.integers(0, 256, (1, S, K)).astype(np.uint8), "keep": keep})
    compared, mismatches = compare_graph_with_tvm(model, feeds, out_dir=tmp_path)
    assert mismatches == []
    assert compared == 4 * 7  # every lowbit op's result, on every feed
    meta = (tmp_path / "check.json").read_text()
    assert '"requantize_fused": 1' in meta  # the GEMM's requantize ran in its epilogue


def test_outputs_are_not_degenerate():
    """The graph's values span their ranges (a saturated or constant output would hide kernel errors)."""
    from lowbit.runtime.reference import ReferenceInterpreter

    rng = np.random.default_rng(0)
    model = _graph(rng)
    keep = np.ones((1, 1, N), bool)
    env = ReferenceInterpreter(model).run(list(model.graph), {"x": rng.integers(0, 256, (1, S, K)).astype(np.uint8),
                                                              "keep": keep})
    for name in ("y1", "y3", "y4", "y5", "y6", "y7"):
        assert len(np.unique(env[name])) > 20, name
    assert np.ptp(env["y2"].astype(np.int32)) > 1000


@pytest.mark.slow  # cross-compile + qemu-aarch64 (the interpreter and TVM's runtime emulated): minutes
def test_every_integer_op_bit_exact_on_aarch64_under_qemu(tmp_path):
    import os

    from aarch64_runtime import missing, qemu_run
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    rng = np.random.default_rng(0)
    model = _graph(rng)
    feeds = [{"x": rng.integers(0, 256, (1, S, K)).astype(np.uint8), "keep": rng.random((1, 1, N)) < 0.8}
             for _ in range(4)]
    compared, mismatches = compare_graph_with_tvm(model, feeds, target="aarch64-linux", out_dir=tmp_path, run=qemu_run)
    assert compared == 4 * 7 and mismatches == []
    assert b"ELF" in (tmp_path / "check.so").read_bytes()[:4]
    import json

    assert "aarch64-linux-gnu" in json.loads((tmp_path / "check.json").read_text())["target"]
