"""lowbit's integer TIR kernels one by one (CPU builds), bit for bit against plain-numpy formulas written
from the ops' definitions (int64 arithmetic, no lowbit code): the int8 GEMM with its dyadic requantize,
in its VNNI and portable forms, with and without the row tail of its register blocking."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from lowbit.backends.tvm_integer_kernels import TILE, int8_matmul_requantize_cpu  # noqa: E402
from lowbit.backends.tvm_kernels import has_vnni  # noqa: E402
from lowbit.backends.tvm_lower import make_target  # noqa: E402

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def _run(func, target, *arrays, out):
    dev = tvm.cpu()
    f = tvm.compile(tvm.IRModule({"main": func}), target=target)
    res = tvm.runtime.tensor(out, dev)
    f["main"](*(tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in arrays), res)
    return res.numpy()


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("M,K,nt,dt", [(14, 64, 2, "int16"), (8, 96, 1, "uint8"), (3, 128, 3, "int8")])
def test_int8_matmul_requantize_exact(M, K, nt, dt, vnni):
    """Y = clip(((A·W − C)·b + 2^(c−1)) >> c + zp) per output channel, C = a_zp·colsum(W) − offset."""
    target = make_target("llvm")
    if vnni and not has_vnni(target):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(M * K + nt)
    N = nt * TILE
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    corr = rng.integers(-50000, 50000, N).astype(np.int32)
    lo, hi = RANGES[dt]
    b = rng.integers(1 << 12, 1 << 13, N).astype(np.int64)
    spread = 128 * 74 * np.sqrt(K) * (1 << 13) / (hi - lo)  # |acc| ≈ 128·74·√K: map its spread onto the range
    c = (int(np.log2(spread)) + rng.integers(-1, 2, N)).astype(np.int64)
    zp = rng.integers(lo // 4, hi // 4 + 1, N).astype(dt)
    packed = w.reshape(K // 4, 4, nt, TILE).transpose(2, 0, 3, 1)  # [tile, k/4, lane, 4]
    got = _run(int8_matmul_requantize_cpu(K, nt, dt, vnni), target, a, corr.reshape(nt, TILE), packed, b, c, zp,
               out=np.zeros((M, N), dt))
    acc = a.astype(np.int64) @ w.astype(np.int64) - corr
    ref = np.clip(((acc * b + (1 << (c - 1))) >> c) + zp.astype(np.int64), lo, hi).astype(dt)
    assert np.array_equal(got, ref)
    assert len(np.unique(got)) > 20  # neither saturated nor constant


@pytest.mark.parametrize("x_dtype,t_dtype,per_channel", [("uint8", "uint8", True), ("int8", "int16", True),
                                                         ("int8", "int8", False)])
def test_lookup_exact(x_dtype, t_dtype, per_channel):
    """lowbit.Lookup: y[r, n] = table[n][x[r, n] − min(x)] per channel, or one table for all."""
    from lowbit.backends.tvm_integer_kernels import lookup_cpu

    rng = np.random.default_rng(3)
    R, N = 5, 40
    x = rng.integers(*RANGES[x_dtype], (R, N), endpoint=True).astype(x_dtype)
    tables = rng.integers(*RANGES[t_dtype], (N if per_channel else 1, 256), endpoint=True).astype(t_dtype)
    got = _run(lookup_cpu(N, tables.shape[0], x_dtype, t_dtype), make_target("llvm"), x, tables.reshape(-1),
               out=np.zeros((R, N), t_dtype))
    rows = np.arange(N)[None, :] if per_channel else np.zeros((1, N), int)
    assert np.array_equal(got, tables[rows, x.astype(np.int64) - RANGES[x_dtype][0]])


def _attention_graph(rng, H: int, S: int, D: int, per_channel: bool):
    """q·kᵀ → Requantize → IntSoftmax(mask) → p·v → Transpose → Reshape → Requantize: integer-attention's chain."""
    from onnx import TensorProto, helper, numpy_helper
    import onnx_ir as ir

    from lowbit.ops.integer_nonlinear import exp_table
    from lowbit.ops.integer_ops import dyadic

    b1, c1, _ = dyadic(np.array([30 / (74 * 74 * np.sqrt(D))]))  # logit codes spread ±30
    n2 = H * D if per_channel else 1
    b2, c2, _ = dyadic(rng.uniform(0.6, 1.0, n2) * 40 / (255 * 74 / 3))  # context codes spread ±40
    zp2 = rng.integers(100, 140, n2).astype(np.uint8) if per_channel else np.asarray(128, np.uint8)
    inits = {"zq": np.asarray(128, np.uint8), "zk": np.asarray(121, np.uint8), "zv": np.asarray(133, np.uint8),
             "zp": np.asarray(0, np.uint8), "b1": b1.reshape(()), "c1": c1.reshape(()), "z1": np.asarray(-3, np.int8),
             "table": exp_table(0.08), "shape": np.array([1, S, H * D], np.int64),
             "b2": b2.reshape(-1) if per_channel else b2.reshape(()), "c2": c2.reshape(-1) if per_channel else c2.reshape(()),
             "z2": zp2}
    L = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], domain="lowbit", name=out, **kw)  # noqa: E731
    nodes = [helper.make_node("MatMulInteger", ["q", "kt", "zq", "zk"], ["qk"], name="qk"),
             L("Requantize", ["qk", "b1", "c1", "z1"], "logits"),
             L("IntSoftmax", ["logits", "table", "keep"], "probs"),
             helper.make_node("MatMulInteger", ["probs", "v", "zp", "zv"], ["pv"], name="pv"),
             helper.make_node("Transpose", ["pv"], ["ctx0"], perm=[0, 2, 1, 3], name="ctx0"),
             helper.make_node("Reshape", ["ctx0", "shape"], ["ctx1"], name="ctx1"),
             L("Requantize", ["ctx1", "b2", "c2", "z2"], "ctx")]
    u8 = TensorProto.UINT8
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", u8, [1, H, S, D]), helper.make_tensor_value_info("kt", u8, [1, H, D, S]),
         helper.make_tensor_value_info("v", u8, [1, H, S, D]), helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, S, S])],
        [helper.make_tensor_value_info("ctx", u8, [1, S, H * D])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lowbit", 1)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("H,S,D,per_channel", [(2, 32, 16, True), (3, 12, 8, False)])  # VNNI form (where the CPU has it); portable form
def test_fused_attention_matches_reference(tmp_path, H, S, D, per_channel):
    """The attention chain compiled as one kernel gives the reference's context codes bit for bit."""
    import onnx_ir as ir

    from lowbit.backends.tvm_integer import fold_static_shapes
    from lowbit.backends.tvm_integer_attention import fuse_integer_attention
    from lowbit.backends.tvm_lower import lower_tvm
    from lowbit.runtime.reference import ReferenceInterpreter
    from lowbit.runtime.tvm_runner import TvmSession

    rng = np.random.default_rng(S)
    model = _attention_graph(rng, H, S, D, per_channel)
    shapes = {"q": [1, H, S, D], "kt": [1, H, D, S], "v": [1, H, S, D], "keep": [1, 1, S, S]}
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    fold_static_shapes(probe, shapes)
    assert fuse_integer_attention(probe) == 1 and [n.op_type for n in probe.graph] == ["IntAttention", "Transpose", "Reshape"]
    sess = TvmSession(lower_tvm(model, "llvm", tmp_path, "att", shape_dict=shapes).lib)
    interp = ReferenceInterpreter(model)
    for i in range(3):
        keep = np.tril(np.ones((S, S), bool))[None, None] if i == 0 else rng.random((1, 1, S, S)) < 0.7
        keep[..., 2, :] = False  # a row with nothing kept
        feed = {"q": rng.integers(0, 256, (1, H, S, D)).astype(np.uint8), "kt": rng.integers(0, 256, (1, H, D, S)).astype(np.uint8),
                "v": rng.integers(0, 256, (1, H, S, D)).astype(np.uint8), "keep": keep}
        env = interp.run(list(model.graph), feed)
        got, = sess.run(None, feed)
        assert np.array_equal(got, env["ctx"])
        assert len(np.unique(env["ctx"])) > 20 and len(np.unique(env["probs"])) > 20  # not saturated or constant


@pytest.mark.slow  # cross-compiled and run under qemu-aarch64: about a minute
def test_fused_attention_on_aarch64_under_qemu(tmp_path):
    """The portable attention kernel (no VNNI on aarch64), cross-compiled, gives the reference's codes."""
    import os

    from aarch64_runtime import missing, qemu_run
    from lowbit.backends.tvm_integer_export import export_tvm
    from lowbit.runtime.reference import ReferenceInterpreter

    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    H, S, D = 2, 16, 16
    rng = np.random.default_rng(7)
    model = _attention_graph(rng, H, S, D, True)
    shapes = {"q": [1, H, S, D], "kt": [1, H, D, S], "v": [1, H, S, D], "keep": [1, 1, S, S]}
    art = export_tvm(model, "aarch64-linux", tmp_path / "att", shapes)
    assert b"lowbit_int_attention_plain" in art.lib.read_bytes()  # the fused kernel, portable form
    feeds = [{"q": rng.integers(0, 256, (1, H, S, D)).astype(np.uint8), "kt": rng.integers(0, 256, (1, H, D, S)).astype(np.uint8),
              "v": rng.integers(0, 256, (1, H, S, D)).astype(np.uint8), "keep": rng.random((1, 1, S, S)) < 0.7}
             for _ in range(2)]
    interp = ReferenceInterpreter(model)
    for feed, got in zip(feeds, qemu_run(art.lib, feeds)):
        assert np.array_equal(got["ctx"], interp.run(list(model.graph), feed)["ctx"])


def _norm_graph(rng, C: int, rms: int):
    """Add(Cast(a), Cast(b)) → IntNorm → (y, Cast → Requantize per channel → y2): the residual block's tail."""
    from onnx import TensorProto, helper, numpy_helper
    import onnx_ir as ir

    from lowbit.ops.integer_ops import dyadic

    b, c, _ = dyadic(rng.uniform(0.5, 1.0, C) / 40)
    inits = {"zx": np.asarray(7, np.int32), "g": rng.integers(1 << 25, 1 << 27, C).astype(np.int64),
             "beta": rng.integers(-(1 << 40), 1 << 40, C).astype(np.int64), "zp": np.asarray(0, np.int16),
             "b": b, "c": c, "z": rng.integers(110, 140, C).astype(np.uint8)}
    i32 = TensorProto.INT32
    nodes = [helper.make_node("Cast", ["a"], ["a32"], to=i32, name="ca"), helper.make_node("Cast", ["r"], ["r32"], to=i32, name="cr"),
             helper.make_node("Add", ["a32", "r32"], ["s"], name="add"),
             helper.make_node("IntNorm", ["s", "zx", "g", "beta", "zp"], ["y"], domain="lowbit", name="norm", rms=rms,
                              frac_bits=20, shift=36, n_min=1),
             helper.make_node("Cast", ["y"], ["y32"], to=i32, name="cy"),
             helper.make_node("Requantize", ["y32", "b", "c", "z"], ["y2"], domain="lowbit", name="rq"),
             helper.make_node("Cast", ["y"], ["yo"], to=i32, name="co")]
    graph = helper.make_graph(
        nodes, "norm", [helper.make_tensor_value_info("a", TensorProto.INT16, [1, 5, C]),
                        helper.make_tensor_value_info("r", TensorProto.INT8, [1, 5, C])],
        [helper.make_tensor_value_info("yo", i32, [1, 5, C]), helper.make_tensor_value_info("y2", TensorProto.UINT8, [1, 5, C])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("lowbit", 1)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("rms", [0, 1])
def test_fused_norm_matches_reference(tmp_path, rms):
    """Residual add + IntNorm + Requantize of its codes as one kernel: the reference's codes, both outputs."""
    import onnx_ir as ir

    from lowbit.backends.tvm_integer import fold_static_shapes
    from lowbit.backends.tvm_integer_norm import fuse_integer_norms
    from lowbit.backends.tvm_lower import lower_tvm
    from lowbit.runtime.reference import ReferenceInterpreter
    from lowbit.runtime.tvm_runner import TvmSession

    C = 96
    rng = np.random.default_rng(rms)
    model = _norm_graph(rng, C, rms)
    shapes = {"a": [1, 5, C], "r": [1, 5, C]}
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    fold_static_shapes(probe, shapes)
    assert fuse_integer_norms(probe) == 1 and [n.op_type for n in probe.graph] == ["IntNormFused", "Cast"]
    sess = TvmSession(lower_tvm(model, "llvm", tmp_path, "norm", shape_dict=shapes).lib)
    interp = ReferenceInterpreter(model)
    for _ in range(2):
        feed = {"a": rng.integers(-3000, 3000, (1, 5, C)).astype(np.int16), "r": rng.integers(-128, 128, (1, 5, C)).astype(np.int8)}
        env = interp.run(list(model.graph), feed)
        got = dict(zip(sess.output_names, sess.run(None, feed)))
        assert np.array_equal(got["yo"], env["yo"]) and np.array_equal(got["y2"], env["y2"])
        assert len(np.unique(env["y2"])) > 20 and len(np.unique(env["yo"])) > 100
