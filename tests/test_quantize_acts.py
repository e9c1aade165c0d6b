"""quantize-acts: the inserted per-token quantizer equals a numpy reference written here from the formula
(t = max|x_row| / (2^(b−1) − 1), x̂ = clip(round(x/t), −2^(b−1), 2^(b−1) − 1)·t); lm_head stays float;
static int8 steps are max|x| / 127 over the calibration data."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit.ir.graph_builder import GraphBuilder
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session


def fake_quant_per_token(x: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    t = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / qmax
    return np.clip(np.round(x / t), -qmax - 1, qmax) * t


def _one_linear(w):
    g = GraphBuilder(opset=23)
    x = g.input("x", TensorProto.FLOAT, [3, 5, 16])
    g.output("y", TensorProto.FLOAT, [3, 5, 8])
    g.op("MatMul", [x, g.init("proj.weight", w)], name="proj", out="y")
    return g.build("one")


def test_static_steps_are_the_calibrated_absmax_over_127():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((3, 5, 16)) * 3).astype(np.float32)} for _ in range(3)]
    ctx = CompileContext(calibration=feeds, probes=feeds[:1], show_progress=False)
    model = PassManager.from_pipeline("calibrate,quantize-acts{bits=8,static=true}", ctx).run(_one_linear(w))
    (q,) = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    step = max(float(np.abs(f["x"]).max()) for f in feeds) / 127
    assert float(q.inputs[1].const_value.numpy()) == pytest.approx(step, rel=1e-6)
    xs = feeds[0]["x"]
    want = (np.clip(np.round(xs / step), -128, 127) * step) @ w
    got = make_session(model, optimize=False).run(None, {"x": xs})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_quantizer_matches_reference(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    g = GraphBuilder(opset=23)
    x = g.input("x", TensorProto.FLOAT, [3, 5, 16])
    g.output("y", TensorProto.FLOAT, [3, 5, 8])
    g.op("MatMul", [x, g.init("proj.weight", w)], name="proj", out="y")
    model = g.build("one")
    model = PassManager.from_pipeline(f"quantize-acts{{bits={bits}}}", CompileContext()).run(model)
    xs = (rng.standard_normal((3, 5, 16)) * rng.random((3, 5, 1)) * 10).astype(np.float32)
    got = make_session(model, optimize=False).run(None, {"x": xs})[0]
    want = fake_quant_per_token(xs, bits) @ w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    codes = fake_quant_per_token(xs, bits) / (np.abs(xs).max(-1, keepdims=True) / (2 ** (bits - 1) - 1))
    assert np.allclose(codes, np.round(codes), atol=1e-3) and len(np.unique(np.round(codes))) <= 2 ** bits


def test_excluded_head_keeps_float_input():
    from lowbit_models import random_llama

    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=64)
    model = PassManager.from_pipeline("quantize-acts{bits=4}", CompileContext()).run(model)
    head = next(n for n in model.graph if n.name == "lm_head")
    assert head.inputs[0].producer().op_type == "RMSNormalization"
    assert sum(n.op_type == "Round" for n in model.graph) == 4  # attn_norm, attention output, ffn_norm, gated


def test_static_int8_activations_use_calibrated_per_tensor_steps(stories_bin, stories_calibration):
    import lowbit
    from lowbit.quant.stats import act_stats  # noqa: F401  (the steps come from calibration)

    result = lowbit.compile(lowbit.load_model(stories_bin), "calibrate,quantize-acts{bits=8,static=true}",
                            calibration=stories_calibration[:4], progress=False)
    qs = [n for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert len(qs) == 20  # 21 linear inputs, lm_head's (final norm) excluded
    for q in qs:
        assert q.inputs[2].const_value.dtype.name == "INT8" and int(q.inputs[2].const_value.numpy()) == 0
        assert float(q.inputs[1].const_value.numpy()) > 0


def test_static_needs_calibration(stories_model):
    import pytest

    import lowbit

    with pytest.raises(lowbit.LowbitError, match="put 'calibrate' before 'quantize-acts'"):
        lowbit.compile(stories_model, "quantize-acts{bits=8,static=true}", progress=False)


def test_clip_ratio_narrows_the_per_token_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    g = GraphBuilder(opset=23)
    x = g.input("x", TensorProto.FLOAT, [4, 16])
    g.output("y", TensorProto.FLOAT, [4, 8])
    g.op("MatMul", [x, g.init("proj.weight", w)], name="proj", out="y")
    model = PassManager.from_pipeline("quantize-acts{bits=4,clip=0.8}", CompileContext()).run(g.build("one"))
    xs = rng.standard_t(2, (4, 16)).astype(np.float32)
    got = make_session(model, optimize=False).run(None, {"x": xs})[0]
    t = 0.8 * np.abs(xs).max(-1, keepdims=True) / 7  # QuaRot-style clipped int4 step, written out
    np.testing.assert_allclose(got, (np.clip(np.round(xs / t), -8, 7) * t) @ w, rtol=1e-4, atol=1e-4)
