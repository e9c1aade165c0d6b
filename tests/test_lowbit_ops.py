"""lowbit ops: numpy reference == ORT function body == fast path; MatMulNBits packing == ORT's quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.ops import registry as L
from lowbit.ops import float_ops as F
from lowbit.backends.nbits import nbits_node_inputs
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.backends.expand3 import expand_3bit
from lowbit.ir.sessions import make_session


def _model(node, x_shape, inits, y_shape):
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(L.DOMAIN, 1)])
    proto.ir_version = 10
    model = ir.serde.deserialize_model(proto)
    L.attach_functions(model)
    return model


@pytest.mark.parametrize("k,block", [(172, 32), (64, 64), (256, 128), (100, 16)])
def test_matmul3bit_reference_function_fast(k, block):
    rng = np.random.default_rng(k)
    n, g = 48, -(-k // block)
    codes = rng.integers(0, 8, (n, k)).astype(np.uint8)
    packed = F.pack3(codes)
    assert packed.nbytes == n * (-(-k // 8)) * 3  # 3 bits per weight
    assert np.array_equal(F.unpack3(packed, k), codes)
    s = (rng.random((n, g)) + 0.1).astype(np.float32)
    z = rng.integers(0, 8, (n, g)).astype(np.uint8)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    node = helper.make_node("MatMul3Bit", ["x", "B", "s", "z"], ["y"], domain=L.DOMAIN, block_size=block)
    model = _model(node, [2, 5, k], {"B": packed, "s": s, "z": z}, [2, 5, n])
    L.register_schemas()
    onnx.checker.check_model(ir.serde.serialize_model(model))
    ref = F.matmul3bit_reference(x, packed, s, z, block)
    w = (codes.astype(np.float64) - np.repeat(z, block, 1)[:, :k]) * np.repeat(s, block, 1)[:, :k]
    np.testing.assert_allclose(ref, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)
    body = make_session(model, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(body, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    model.graph.node(0).metadata_props["lowbit.k"] = str(k)
    assert expand_3bit(model) == 1
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    fast = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n,m", [(64, 1), (172, 43), (256, 1), (96, 3)])
def test_hadamard_reference_function_kron(n, m):
    rng = np.random.default_rng(n)
    q = np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32) if m > 1 else np.ones((1, 1), np.float32)
    x = rng.standard_normal((2, 7, n)).astype(np.float32)
    ref = F.hadamard_reference(x, q)
    mat = np.kron(F.hadamard_matrix(n // m), q)
    np.testing.assert_allclose(mat @ mat.T, np.eye(n), atol=1e-6)  # orthogonal
    np.testing.assert_allclose(np.linalg.norm(ref, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    node = helper.make_node("Hadamard", ["x", "Q"], ["y"], domain=L.DOMAIN)
    model = _model(node, [2, 7, n], {"Q": q}, [2, 7, n])
    body = make_session(model, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(body, ref, rtol=1e-5, atol=1e-5)
    model.graph.node(0).metadata_props["lowbit.width"] = str(n)
    lowered = PassManager.from_pipeline("lower-nbits", CompileContext(properties={"quantized"})).run(model)
    assert "Hadamard" not in {nd.op_type for nd in lowered.graph}
    fast = make_session(lowered).run(None, {"x": x})[0]
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_packing_matches_ort_quantizer(bits, symmetric):
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    quantize = {2: mq.quantize_matmul_2bits, 4: mq.quantize_matmul_4bits, 8: mq.quantize_matmul_8bits}[bits]
    k, n, block = 172, 24, 32
    w = np.random.default_rng(bits).standard_normal((k, n)).astype(np.float32)
    kb, per = -(-k // block), 8 // bits
    packed = np.zeros((n, kb, block // per), np.uint8)
    zp = np.zeros((n, -(-kb // per)), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    quantize(packed, np.pad(w, ((0, kb * block - k), (0, 0))), scales, zp, block, n, k, symmetric)
    mask = (1 << bits) - 1
    codes = np.stack([(packed >> (bits * j)) & mask for j in range(per)], -1).reshape(n, -1)[:, :k]
    zps = np.stack([(zp >> (bits * j)) & mask for j in range(per)], -1).reshape(n, -1)[:, :kb]
    b, s, z = nbits_node_inputs(codes, scales, None if symmetric else zps, bits, block)
    assert np.array_equal(b, packed)
    if not symmetric:
        assert np.array_equal(z, zp)
