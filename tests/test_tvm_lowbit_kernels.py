"""``lower-tvm{kernels=lowbit-cpu}``: a compiled TVM model calls lowbit's C kernels for its low-bit linears
(2/4/8-bit MatMulNBits and 3-bit ``lowbit.MatMul3Bit``), and computes what the kernels' formula says:

    y = Σ_g (Σ_{k∈g} (c[k, n] − z[g, n])·xq[k]) · s[g, n] · sa[g],   xq = rint(x·127/amax_g), sa = amax_g/127,

checked against plain numpy on the codes decoded from the ONNX file (its documented layouts)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm")

from lowbit.backends.tvm_lower import lower_tvm  # noqa: E402
from lowbit.ir.sessions import make_session  # noqa: E402
from lowbit.passmanager import CompileContext, PassManager  # noqa: E402
from lowbit.runtime.tvm_runner import TvmSession  # noqa: E402

K, N, M = 256, 80, 3


def _linear(seed: int) -> ir.Model:
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [K, N], w.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return ir.serde.deserialize_model(m)


def _decode(model: ir.Model):
    """codes [N, K], scales [N, G], zero points [N, G], block from the lowered file's only linear."""
    return _decode_node(next(n for n in model.graph if n.op_type in ("MatMulNBits", "MatMul3Bit")), N)


def _decode_node(node: ir.Node, N: int):  # noqa: N803
    arr = lambda i: node.inputs[i].const_value.numpy()  # noqa: E731
    if node.op_type == "MatMul3Bit":  # 8 codes per 3 little-endian bytes
        block = node.attributes["block_size"].as_int()
        b = arr(1).reshape(N, -1, 3).astype(np.uint32)
        word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16
        codes = ((word[..., None] >> (3 * np.arange(8, dtype=np.uint32))) & 7).reshape(N, -1)[:, :K]
        return codes.astype(np.int64), arr(2).reshape(N, -1), arr(3).reshape(N, -1).astype(np.int64), block, node
    bits, block = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
    per, mask = 8 // bits, (1 << bits) - 1
    unpack = lambda a: np.stack([(a >> (bits * j)) & mask for j in range(per)], -1).reshape(N, -1)  # noqa: E731
    g = K // block
    zp = unpack(arr(3))[:, :g] if len(node.inputs) > 3 else np.full((N, g), 1 << (bits - 1))
    return unpack(arr(1)).astype(np.int64), arr(2).reshape(N, g), zp.astype(np.int64), block, node


def _kernel_formula(x, codes, scales, zps, block):
    M, K = x.shape  # noqa: N806
    N = codes.shape[0]  # noqa: N806
    g = K // block
    xg = x.reshape(M, g, block)
    amax = np.abs(xg).max(-1)
    inv = (np.float32(127) / amax).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64)
    d = np.einsum("mgk,ngk->mng", xq, codes.reshape(N, g, block)) - zps[None] * xq.sum(-1)[:, None, :]
    return (d * scales.astype(np.float64)[None] * (amax / np.float32(127)).astype(np.float64)[:, None, :]).sum(-1)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, 64), (2, 16), (3, 16)])
def test_lowbit_cpu_kernels_in_a_tvm_model(bits, group, tmp_path):
    pipeline = f"quantize-weights{{bits={bits},group={group},method=rtn,symmetric=false}},lower-nbits{{accuracy_level=0,slow=allow}}"
    model = PassManager.from_pipeline(pipeline, CompileContext()).run(_linear(bits))
    codes, scales, zps, block, node = _decode(model)
    assert block == group and node.op_type == ("MatMul3Bit" if bits == 3 else "MatMulNBits")
    x = np.random.default_rng(7).standard_normal((M, K)).astype(np.float32)
    art = lower_tvm(model, "llvm", tmp_path, "m", kernels="lowbit-cpu")
    meta = json.loads(art.meta.read_text())
    assert meta["kernels"] == "lowbit-cpu" and meta["prepare"].get("matmul3bit", 0) + meta["prepare"]["matmulnbits"] == 1
    y = TvmSession(art.lib).run(None, {"x": x})[0]
    ref = _kernel_formula(x, codes, scales, zps, block)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    if bits != 3:  # ORT's exact float-activation kernel: the int8 activations cost < 2 % of the output scale
        exact = make_session(model).run(None, {"x": x})[0]
        assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


def test_kernels_option_validated():
    from lowbit.backends.tvm_lower import LowerTvm

    with pytest.raises(ValueError, match="kernels must be"):
        LowerTvm.Options(kernels="lowbit-gpu")
    with pytest.raises(ValueError, match="needs target=llvm"):
        LowerTvm.Options(target="cuda", kernels="lowbit-cpu")


def test_c_and_python_bridges_agree(tmp_path):
    """The C packed function (built against tvm-ffi's header) and the Python one give identical outputs."""
    from lowbit.backends.kernels import tvm_bridge

    model = PassManager.from_pipeline("quantize-weights{bits=4,group=64,method=rtn},lower-nbits", CompileContext()
                                      ).run(_linear(11))
    art = lower_tvm(model, "llvm", tmp_path, "m", kernels="lowbit-cpu")
    x = np.random.default_rng(3).standard_normal((M, K)).astype(np.float32)
    outs = {}
    try:
        for prefer_c in (True, False):
            how = tvm_bridge.register(prefer_c=prefer_c)
            assert how == ("c" if prefer_c else "python")
            outs[how] = TvmSession(art.lib).run(None, {"x": x})[0]
    finally:
        tvm_bridge.register(prefer_c=True)
    np.testing.assert_array_equal(outs["c"], outs["python"])


def test_mixed_bits_per_layer(tmp_path):
    """Per-layer bits (the mixed-precision contract: ``lowbit.bits`` on each MatMul): 3-bit then 2-bit then
    8-bit linears in one TVM module, all on the kernels, equal to the formula applied layer by layer."""
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((K, K)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="l0"), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="l1"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="l2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [K, K], w.ravel()) for i, w in enumerate(ws)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    model = ir.serde.deserialize_model(m)
    for node, bits in zip([n for n in model.graph if n.op_type == "MatMul"], (3, 2, 8)):
        node.metadata_props["lowbit.bits"] = str(bits)
    model = PassManager.from_pipeline("quantize-weights{group=64,method=rtn,symmetric=false},lower-nbits",
                                      CompileContext()).run(model)
    layers = [n for n in model.graph if n.op_type in ("MatMulNBits", "MatMul3Bit")]
    assert [n.op_type for n in layers] == ["MatMul3Bit", "MatMulNBits", "MatMulNBits"]
    assert [n.attributes["bits"].as_int() for n in layers[1:]] == [2, 8]
    art = lower_tvm(model, "llvm", tmp_path, "m", kernels="lowbit-cpu")
    x = np.random.default_rng(4).standard_normal((M, K)).astype(np.float32)
    y = TvmSession(art.lib).run(None, {"x": x})[0]
    h = x
    for i, node in enumerate(layers):
        codes, scales, zps, block, _ = _decode_node(node, K)
        h = _kernel_formula(h.astype(np.float32), codes, scales, zps, block)
        h = np.maximum(h, 0) if i < 2 else h
    # float32 between layers vs float64 here can move an activation code by one: 1e-4 of the output scale
    np.testing.assert_allclose(y, h, rtol=0, atol=1e-4 * np.abs(h).max())


def test_matmul3bit_on_the_tir_path(tmp_path):
    """Without kernels, a 3-bit layer runs TVM's 4-bit TIR kernel on the same codes: x @ W exactly (float)."""
    model = PassManager.from_pipeline("quantize-weights{bits=3,group=64,method=rtn,symmetric=false},lower-nbits",
                                      CompileContext()).run(_linear(5))
    codes, scales, zps, block, node = _decode(model)
    assert node.op_type == "MatMul3Bit"
    w = (codes - np.repeat(zps, block, 1)) * np.repeat(scales.astype(np.float64), block, 1)  # [N, K]
    x = np.random.default_rng(9).standard_normal((M, K)).astype(np.float32)
    art = lower_tvm(model, "llvm", tmp_path, "m")
    y = TvmSession(art.lib).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
