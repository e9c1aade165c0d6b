"""dyadic's int32 overflow proof at its exact boundary (HAWQ-V3 integer-only GEMM, uint8 × int8):
per output channel n, ``|acc_n + k_n| ≤ 255·Σ_c|Wq[c,n]| + |k_n|`` must stay ≤ 2^31 − 1.

The QDQ graph is built here directly (σ = 1, s_w = 1, z = 0, so k_n is the bias in integers and the
bound is computed exactly in numpy): a channel whose bound equals 2^31 − 1 is accepted, one more
unit is refused.  A proof over x ≤ 256, a ``≥`` for ``>`` or a dropped |k| moves the edge.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import PassFailure
from lowbit.passmanager.manager import QUANTIZED, CompileContext, PassManager

INT32_MAX = 2 ** 31 - 1
S = INT32_MAX // 255  # Σ|Wq| of the loud channel: 255·S = 2^31 − 128
K = -(-S // 127)  # rows needed with |Wq| ≤ 127


def _qdq_model(bias_int: int, negative: bool = False) -> ir.Model:
    wq = np.zeros((K, 2), np.int8)
    col = np.full(K, 127, np.int64)
    col[-1] = S - 127 * (K - 1)  # Σ|Wq[:, 0]| == S exactly
    wq[:, 0] = (-col if negative else col).astype(np.int8)
    wq[:3, 1] = [5, -7, 9]  # a quiet second channel
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.array(1.0, np.float32), "sigma"), (np.array(0, np.uint8), "z"), (wq, "wq"),
        (np.ones(2, np.float32), "sw"), (np.array([bias_int, 3], np.float32), "bias")]]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sigma", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "sigma", "z"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], name="wdq", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _dyadic(model):
    feeds = [{"x": np.zeros((1, K), np.float32)}]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    ctx.properties.add(QUANTIZED)  # the QDQ form is written here, not by a quantizing pass
    return PassManager.from_pipeline("dyadic", ctx).run(model)


def test_the_case_sits_on_the_boundary():
    assert 255 * S + 127 == INT32_MAX and S - 127 * (K - 1) in range(1, 128)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("bias_sign", [1, -1])
def test_a_bound_of_exactly_int32_max_is_accepted(negative, bias_sign):
    model = _dyadic(_qdq_model(bias_sign * (INT32_MAX - 255 * S), negative))
    ops = [n.op_type for n in model.graph]
    assert "MatMulInteger" in ops or any(n.domain.startswith("lowbit") for n in model.graph), ops


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("bias_sign", [1, -1])
def test_one_more_is_refused(negative, bias_sign):
    with pytest.raises(PassFailure, match="int32 accumulator can overflow in output channel 0"):
        _dyadic(_qdq_model(bias_sign * (INT32_MAX - 255 * S + 1), negative))


@pytest.mark.parametrize("what", ["activation scale", "weight codes"])
def test_a_linear_outside_the_integer_form_is_left_alone(what):
    """dyadic rewrites only MatMul(DQ(uint8 x; constant σ, z), DQ(int8 2-D Wq; constant s_w)): a computed
    activation scale, or uint8 weight codes, is not that form; with no other linear the pass refuses."""
    wq = np.arange(-6, 6, dtype=np.int8).reshape(4, 3)
    sigma = helper.make_tensor_value_info("sigma", TensorProto.FLOAT, [])
    inits = [numpy_helper.from_array(np.array(0, np.uint8), "z"), numpy_helper.from_array(np.ones(3, np.float32), "sw"),
             numpy_helper.from_array(wq.astype(np.uint8) if what == "weight codes" else wq, "wq")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    if what == "activation scale":
        inputs.append(sigma)
    else:
        inits.append(numpy_helper.from_array(np.array(0.1, np.float32), "sigma"))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sigma", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "sigma", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    ctx = CompileContext(calibration=[{"x": np.ones((1, 4), np.float32), "sigma": np.array(0.1, np.float32)}],
                         show_progress=False)
    ctx.properties.add(QUANTIZED)
    with pytest.raises(PassFailure, match="no quantized linear in QDQ form"):
        PassManager.from_pipeline("dyadic", ctx).run(ir.serde.deserialize_model(proto))
