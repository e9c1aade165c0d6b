"""dyadic against the QDQ graph it came from: every requantized tensor is within ±1 LSB of the QDQ
graph's float value quantized at the same step and zero point (and almost always equal), and the
int32 path to a graph output is within one accumulator LSB (the bias rounding).  An off-by-one
shift, a wrong multiplier or a dropped zero-point correction moves codes by far more.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.analysis import const_array
from lowbit.passmanager.manager import CompileContext, PassManager
from onnx_text import ort_outputs, parse

C, H, N = 16, 24, 8


def _lit(a):
    return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))


@pytest.fixture(scope="module", params=["dyadic", "dyadic{shared_shift=false}", "dyadic{mult_bits=12}",
                                        "dyadic{out_bits=16}"])
def graphs(request):
    rng = np.random.default_rng(11)
    gamma, beta = (0.5 + rng.random(C)).astype(np.float32), (0.3 * rng.standard_normal(C)).astype(np.float32)
    w1, b1 = (rng.standard_normal((C, H)) * 0.4).astype(np.float32), (0.5 * rng.standard_normal(H)).astype(np.float32)
    w2, b2 = (rng.standard_normal((H, N)) * 0.3).astype(np.float32), (0.2 * rng.standard_normal(N)).astype(np.float32)
    text = f"""
    g (float[b, t, {C}] x) => (float[b, t, {N}] y)
    <float[{C}] gamma = {{{_lit(gamma)}}}, float[{C}] beta = {{{_lit(beta)}}}, float[{C}, {H}] w1 = {{{_lit(w1)}}},
     float[{H}] b1 = {{{_lit(b1)}}}, float[{H}, {N}] w2 = {{{_lit(w2)}}}, float[{N}] b2 = {{{_lit(b2)}}}>
    {{
        h = LayerNormalization <axis = -1> (x, gamma, beta)
        m1 = MatMul (h, w1)
        a1 = Add (m1, b1)
        r = Relu (a1)
        m2 = MatMul (r, w2)
        y = Add (m2, b2)
    }}"""
    feeds = [{"x": rng.standard_normal((1, 32, C)).astype(np.float32)} for _ in range(4)]
    ctx = CompileContext(calibration=feeds, probes=feeds[:1], show_progress=False)
    qdq = PassManager.from_pipeline("calibrate{rows=256},migrate-steps", ctx).run(parse(text))
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
    dy = PassManager.from_pipeline(f"{request.param},lower-lowbit", ctx).run(copy)
    return qdq, dy, feeds


def _expose(model, value):
    model.graph.outputs.append(value)
    return len(model.graph.outputs) - 1


def test_requantized_codes_are_within_one_lsb(graphs):
    qdq, dy, feeds = graphs
    a1 = next(n for n in qdq.graph if n.op_type == "Add" and n.outputs[0].name == "a1").outputs[0]
    dq = next(n for n in dy.graph if n.op_type == "DequantizeLinear" and n.name.endswith("out_dq")
              and len(n.inputs) == 3)
    step, zp = float(const_array(dq.inputs[1])), int(const_array(dq.inputs[2]))
    lo, hi = (0, 255) if const_array(dq.inputs[2]).dtype == np.uint8 else (-32768, 32767)
    i_q, i_d = _expose(qdq, a1), _expose(dy, dq.inputs[0])
    diffs = []
    for f in feeds:
        ref = np.clip(np.round(ort_outputs(qdq, f)[i_q].astype(np.float64) / step) + zp, lo, hi)
        diffs.append(ort_outputs(dy, f)[i_d].astype(np.int64) - ref)
    d = np.concatenate([x.reshape(-1) for x in diffs])
    assert np.abs(d).max() <= 1, f"codes off by up to {np.abs(d).max()} LSB"
    if hi == 255:  # int16 steps are 256× finer: the bias rounding (½ accumulator LSB) moves more codes by one
        assert (d == 0).mean() >= 0.95
    del qdq.graph.outputs[i_q], dy.graph.outputs[i_d]


def test_int32_output_is_within_one_accumulator_lsb(graphs):
    """For the last linear, compare from the same input codes: feed both graphs' second layer alike."""
    qdq, dy, feeds = graphs
    dq = next(n for n in dy.graph if n.op_type == "DequantizeLinear" and n.name.endswith("out_dq")
              and len(n.inputs) == 2)
    lsb = const_array(dq.inputs[1]).astype(np.float64)  # σ·s_w per output channel
    codes_d = dq.inputs[0].producer()  # Add(acc, k): int32
    mm = next(n for n in dy.graph if n.op_type == "MatMulInteger" and n.outputs[0] is codes_d.inputs[0])
    x_codes = mm.inputs[0]
    i_c, i_acc = _expose(dy, x_codes), _expose(dy, codes_d.outputs[0])
    wq = const_array(mm.inputs[1]).astype(np.float64)
    m2 = next(n for n in qdq.graph if n.op_type == "MatMul" and n.outputs[0].name == "m2")
    wdq = m2.inputs[1].producer()
    w_hat = const_array(wdq.inputs[0]).astype(np.float64) * const_array(wdq.inputs[1])
    adq = m2.inputs[0].producer()
    for f in feeds:
        outs = ort_outputs(dy, f)
        xq, acc = outs[i_c].astype(np.float64), outs[i_acc].astype(np.float64)
        a_scale = float(np.asarray(const_array(adq.inputs[1])).reshape(-1)[0])
        z = const_array(adq.inputs[2]).astype(np.float64)
        y_qdq = ((xq - z) * a_scale) @ w_hat + const_array(next(
            n for n in qdq.graph if n.op_type == "Add" and n.outputs[0].name == "y").inputs[1])
        np.testing.assert_allclose(acc * lsb, y_qdq, rtol=0, atol=float(lsb.max()) * 0.5 + 1e-5)
    del dy.graph.outputs[max(i_c, i_acc)], dy.graph.outputs[min(i_c, i_acc)]


def test_an_accumulator_that_can_overflow_int32_is_refused():
    """A bias of 1e6 on weights of 1e-3: round(bias / (σ·s_w)) alone exceeds 2^31 − 1."""
    from lowbit.errors import PassFailure

    w = np.full((C, N), 1e-3, np.float32)
    text = f"""
    g (float[b, t, {C}] x) => (float[b, t, {N}] y)
    <float[{C}] gamma = {{{_lit(np.ones(C))}}}, float[{C}, {N}] w = {{{_lit(w)}}},
     float[{N}] bias = {{{_lit(np.full(N, 1e6))}}}>
    {{
        h = RMSNormalization <axis = -1> (x, gamma)
        m = MatMul (h, w)
        y = Add (m, bias)
    }}"""
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 8, C)).astype(np.float32)}]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    with pytest.raises(PassFailure, match="int32 accumulator can overflow"):
        PassManager.from_pipeline("calibrate,migrate-steps,dyadic", ctx).run(parse(text))
