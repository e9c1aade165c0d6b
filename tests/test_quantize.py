"""quantize + lower-ort: arithmetic against numpy, QDQ structure, ORT's integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.backends.ort import INTEGER_GEMMS, ort_integer_kernels
from lowbit.errors import InvalidWeightsError
from lowbit.quant.int8 import quantize_weight_int8
from lowbit.ir.sessions import make_session

_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[B, S, 8] x) => (float[B, S, 4] y) <float[4] bias = {0.5, -1.0, 0.25, 0.0}> {
    h = MatMul (x, w)
    y = Add (h, bias)
}
"""


def _linear_model(w: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(_MODEL)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return ir.serde.deserialize_model(proto)


def _wq(w):
    """Per-output-channel symmetric int8, written from the formula (not lowbit's helper)."""
    amax = np.abs(w).max(axis=0).astype(np.float32)
    sw = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(w / sw), -127, 127).astype(np.int8), sw


def _act_params(lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = np.float32((hi - lo) / 255)
    return step, float(np.clip(np.round(-lo / step), 0, 255))


def _numpy_w8a8_static(x, w, bias, lo, hi):
    step, zp = _act_params(lo, hi)
    xq = np.clip(np.round(x / step) + zp, 0, 255)  # round half to even, like QuantizeLinear
    wq, sw = _wq(w)
    acc = (xq - zp).reshape(-1, x.shape[-1]).astype(np.int64) @ wq.astype(np.int64)
    return (acc * (step * sw)).reshape(*x.shape[:-1], -1) + bias


def test_weight_quantizer_is_per_channel_symmetric():
    w = np.array([[1.0, 0.0, -2.0], [-0.5, 0.0, 1.0]], np.float32)
    wq, sw = quantize_weight_int8(w)
    np.testing.assert_allclose(sw, [1 / 127, 1.0, 2 / 127], rtol=1e-7)  # all-zero column: scale 1
    np.testing.assert_array_equal(wq, [[127, 0, -127], [-64, 0, 64]])
    with pytest.raises(InvalidWeightsError, match="'fc' holds NaN"):
        quantize_weight_int8(np.array([[np.nan]], np.float32), "fc")


@pytest.mark.parametrize("sign", ["mixed", "non-negative", "non-positive"])
def test_static_w8a8_matches_numpy_and_runs_on_integer_kernels(sign):
    """Non-negative inputs (after a ReLU): zero point 0; non-positive: 255; both edges of the uint8 grid."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    f = {"mixed": lambda a: a, "non-negative": np.abs, "non-positive": lambda a: -np.abs(a)}[sign]
    feeds = [{"x": f(rng.standard_normal((2, 5, 8))).astype(np.float32)} for _ in range(3)]
    result = lowbit.compile(_linear_model(w), "calibrate,quantize,lower-ort", calibration=feeds, progress=False)
    lo = min(float(f["x"].min()) for f in feeds)
    hi = max(float(f["x"].max()) for f in feeds)
    sess = make_session(result.model)
    for feed in feeds:  # every feed: one of them holds the extreme value that sits on the grid's edge
        x = feed["x"]
        got = sess.run(None, {"x": x})[0]
        want = _numpy_w8a8_static(x, w, np.array([0.5, -1.0, 0.25, 0.0]), lo, hi)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert result.report["lower-ort"]["ort_integer_gemms"] == 1
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2


@pytest.mark.parametrize("pipeline", ["calibrate,quantize", "quantize{acts=16}"])
def test_the_qdq_graph_itself_computes_the_numpy_result(pipeline):
    """The QDQ graph before lower-ort (what migrate-steps, dyadic and a user's own pipeline read): ORT runs
    its DequantizeLinear nodes as written, so a per-channel scale on the wrong axis shows here; lower-ort
    reads the constants and would hide it."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(3)]
    result = lowbit.compile(_linear_model(w), pipeline, calibration=feeds, progress=False)
    assert "MatMulInteger" not in {n.op_type for n in result.model.graph}
    lo = min(float(f["x"].min()) for f in feeds)
    hi = max(float(f["x"].max()) for f in feeds)
    bias = np.array([0.5, -1.0, 0.25, 0.0])
    sess = make_session(result.model, optimize=False)
    for feed in feeds:
        x = feed["x"]
        if pipeline.startswith("calibrate"):
            want = _numpy_w8a8_static(x, w, bias, lo, hi)
        else:
            wq, sw = _wq(w)
            want = x.astype(np.float64) @ (wq.astype(np.float64) * sw) + bias
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_dynamic_per_token_matches_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32) * np.array([[[1], [10], [0.01]]], np.float32)
    result = lowbit.compile(_linear_model(w), "w8a8-dynamic-nosmooth", progress=False)
    got = make_session(result.model).run(None, {"x": x})[0]
    t = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    xq = np.clip(np.round(x / t), -128, 127)  # per token: each row gets its own step
    wq, sw = _wq(w)
    want = (xq @ wq.astype(np.float32)) * t * sw + np.array([0.5, -1.0, 0.25, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.report["lower-ort"]["ort_integer_gemms"] == 1


def test_dynamic_per_tensor_matches_numpy_and_fuses_into_dynamic_quantize_matmul():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    result = lowbit.compile(_linear_model(w), "w8a8-dynamic-tensor", progress=False)
    got = make_session(result.model).run(None, {"x": x})[0]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (hi - lo) / 255
    zp = np.clip(np.round(-lo / step), 0, 255)
    xq = np.clip(np.round(x / step) + zp, 0, 255) - zp
    wq, sw = _wq(w)
    want = (xq @ wq.astype(np.float32)) * step * sw + np.array([0.5, -1.0, 0.25, 0.0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ort_integer_kernels(result.model)["DynamicQuantizeMatMul"] == 1


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w8a8-dynamic-tensor"])
def test_every_linear_of_stories260k_runs_on_u8s8_kernels(stories_model, stories_calibration, recipe):
    result = lowbit.compile(stories_model, recipe, calibration=stories_calibration, progress=False)
    counts = ort_integer_kernels(result.model)
    assert sum(counts[k] for k in INTEGER_GEMMS) == 36  # 5 layers × 7 linears + head
    # only attention's activation×activation products stay float (ORT fuses q·kᵀ·scale)
    assert counts["MatMul"] + counts["FusedMatMul"] == 10
    for node in result.model.graph:  # weights are int8 (s8), activations uint8 (u8)
        if node.op_type == "MatMulInteger":
            assert node.inputs[0].producer().op_type in ("Cast", "DynamicQuantizeLinear")  # both uint8
            assert node.inputs[1].const_value.dtype == ir.DataType.INT8


def test_weights_only_int8_keeps_activations_float(stories_model):
    result = lowbit.compile(stories_model, "w8a16", progress=False)
    ops = [n.op_type for n in result.model.graph]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 36
    assert result.report["weight_bytes"] < result.report["float_weight_bytes"] / 2.5


def test_exclude_keeps_named_linears_float(stories_model, stories_calibration):
    result = lowbit.compile(stories_model, "calibrate,quantize{exclude=lm_head|down_proj},lower-ort",
                            calibration=stories_calibration[:4], progress=False)
    assert result.report["quantize"]["linears"] == 36 - 6
    assert result.report["lower-ort"]["ort_integer_gemms"] == 30


def test_nan_weights_are_refused_naming_the_initializer(stories_model):
    w = stories_model.graph.initializers["layers.1.mlp.up_proj.weight"]
    arr = w.const_value.numpy().copy()
    arr[3, 7] = np.inf
    w.const_value = ir.tensor(arr, name=w.name)
    with pytest.raises(InvalidWeightsError, match="layers.1.mlp.up_proj.weight.*layers.1.mlp.up_proj"):
        lowbit.compile(stories_model, "w8a16", progress=False)


def test_percentile_ranges_clip_outliers(stories_bin, stories_calibration):
    def act_steps(recipe):
        model = lowbit.compile(lowbit.load_model(stories_bin), recipe, calibration=stories_calibration[:4],
                               progress=False).model
        return {n.name: float(n.inputs[1].const_value.numpy()) for n in model.graph if n.op_type == "QuantizeLinear"}

    full = act_steps("calibrate,quantize,lower-ort")
    clipped = act_steps("calibrate{percentiles=true},quantize{percentile=99.9},lower-ort")
    assert full.keys() == clipped.keys() and len(full) == 21
    assert all(clipped[k] <= full[k] for k in full) and any(clipped[k] < 0.9 * full[k] for k in full)


def test_percentile_without_samples_is_refused(stories_model, stories_calibration):
    with pytest.raises(lowbit.LowbitError, match="percentiles=true"):
        lowbit.compile(stories_model, "calibrate,quantize{percentile=99.9}", calibration=stories_calibration[:2],
                       progress=False)
