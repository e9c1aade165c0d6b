"""Rounding at exact ties, against ONNX's own ``QuantizeLinear`` run by ORT (round half to even, then
saturate): the weight quantizers write codes that the graph's ``DequantizeLinear`` reads, so they must
round as ONNX does.  Random weights almost never land on a tie, so a switch to half-away-from-zero
(``floor(x + 0.5)``, C's ``roundf``) passes every other test; here every column holds ±0.5, ±1.5,
±2.5 steps exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.ir.sessions import make_session
from lowbit.quant.gptq import rtn_quantize
from lowbit.quant.int8 import quantize_weight_int8


def _onnx_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, out: int) -> np.ndarray:
    """ORT's QuantizeLinear(x, scale, zp) per column (axis=1), opset 21."""
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", out, list(x.shape))],
                              [numpy_helper.from_array(scale.astype(np.float32), "s"),
                               helper.make_tensor("z", out, [len(zp)], [int(v) for v in zp])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return make_session(model, optimize=False).run(None, {"x": x.astype(np.float32)})[0]


def _ties(n_cols: int, amax: float) -> np.ndarray:
    """Columns with one entry of magnitude ``amax`` (the step comes out a power of two) and exact half steps."""
    halves = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 4.5, -4.5, 0.0, 6.5])
    w = np.tile(halves[:, None], (1, n_cols))
    w = np.concatenate([w, np.full((1, n_cols), amax)], axis=0)
    return w * (1.0 + np.arange(n_cols))[None, :] / 2.0  # columns of different steps, all powers of two × k


def test_int8_weights_round_half_to_even_like_quantize_linear():
    w = _ties(3, 127.0)  # step = max|w| / 127 = column factor: w/step holds the exact halves
    wq, scale = quantize_weight_int8(w.astype(np.float32))
    assert np.allclose(scale, (1.0 + np.arange(3)) / 2.0)
    want = _onnx_quantize(w, scale, np.zeros(3, np.int8), TensorProto.INT8)
    np.testing.assert_array_equal(wq, want)
    assert wq[2, 0] == 2 and wq[6, 0] == -2  # 2.5 → 2, −2.5 → −2 (half-away would give ±3)


def test_rtn_codes_round_half_to_even_like_quantize_linear():
    # asymmetric 4 bits per channel: lo = −4.5, hi = 10.5 → step = 15/15 = 1, zp = 4.5 → 4 (half to even)
    w = _ties(2, 10.5)
    q, s, z = rtn_quantize(w, 4, 0, symmetric=False)
    np.testing.assert_allclose(s[0], (1.0 + np.arange(2)) / 2.0)
    assert list(z[0]) == [4, 4]  # round(4.5) = 4
    want = _onnx_quantize(w, s[0], z[0], TensorProto.UINT8)  # codes stay ≤ 15 here: no saturation differs
    np.testing.assert_array_equal(q, want)
