"""migrate-steps' step choice against the calibration data itself, in numpy: per channel, the uint8
quantizer ``q = sat(round(x/s) + z)`` must not saturate on the data it was calibrated on (only
rounding error, ≤ s/2), steps are powers of two, and no step is coarser than the balancing rule
allows (s_j < 2·max(a_j, max(a)/ρ) with a_j = range_j/255).  Both arms (steps migrated into the
producer, or kept in a QuantizeLinear) are checked, each on its own terms, so a step choice that
saturates cannot pass by being shared between them.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.analysis import const_array
from lowbit.passmanager.manager import CompileContext, PassManager
from onnx_text import ort_outputs, parse, run

C, N, EPS = 16, 8, 1e-5


def _lit(a):
    return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))


def _build(gamma, beta, w, rng):
    text = f"""
    g (float[b, t, {C}] x) => (float[b, t, {N}] y)
    <float[{C}] gamma = {{{_lit(gamma)}}}, float[{C}] beta = {{{_lit(beta)}}}, float[{C}, {N}] w = {{{_lit(w)}}}>
    {{
        h = LayerNormalization <axis = -1, epsilon = {EPS}> (x, gamma, beta)
        y = MatMul (h, w)
    }}"""
    feeds = [{"x": rng.standard_normal((1, 32, C)).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([f["x"].reshape(-1, C) for f in feeds]).astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + EPS) * gamma + beta  # LayerNorm, written out
    return text, feeds, h, w


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    gamma = (0.5 + rng.random(C)).astype(np.float32)
    gamma[3] = 12.0  # one loud channel: balancing must clamp the others' steps
    beta = (rng.standard_normal(C) * 0.5).astype(np.float32)  # shifted ranges: zero points matter
    beta[5] = 4.0  # an all-positive channel
    w = (rng.standard_normal((C, N)) * 0.3).astype(np.float32)
    return _build(gamma, beta, w, rng)


@pytest.fixture(scope="module")
def wide_case():
    """Steps spanning ~8 000×: the quiet channels' weight rows are large, so their activations' precision matters
    and the reference error keeps falling past ρ = 2^10 (its minimum over all powers of two is at 2^12)."""
    rng = np.random.default_rng(7)
    gamma = ((0.5 + rng.random(C)) * 12 / 8192).astype(np.float32)
    gamma[3] = 12.0
    w = rng.standard_normal((C, N)) * 0.3
    w[np.arange(C) != 3] *= 8192 / 12
    return _build(gamma, np.zeros(C, np.float32), w.astype(np.float32), rng)


def _compile(case, pipeline):
    text, feeds, _, _ = case
    ctx = CompileContext(calibration=feeds, probes=feeds[:1], show_progress=False)
    return run(parse(text), pipeline, ctx)[0], ctx


def _assert_no_saturation(h, s, z):
    q = np.clip(np.round(h / s) + z, 0, 255)
    err = np.abs((q - z) * s - h)
    worst = (err / s).max()
    assert worst <= 0.5 + 1e-6, f"the quantizer saturates: error {worst:.2f} steps on calibration data"


@pytest.mark.parametrize("ratio", [0, 1, 4, 64])
def test_kept_steps_do_not_saturate_and_follow_the_balancing_rule(case, ratio):
    _, _, h, _ = case
    model, _ = _compile(case, f"calibrate{{rows=4096}},migrate-steps{{migrate=false,ratio={ratio}}}")
    ql = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    s, z = const_array(ql.inputs[1]).astype(np.float64), const_array(ql.inputs[2]).astype(np.float64)
    _assert_no_saturation(h, s, z)
    assert np.all(np.exp2(np.round(np.log2(s))) == s), "steps are powers of two"
    lo, hi = np.minimum(h.min(0), 0), np.maximum(h.max(0), 0)
    a = (hi - lo) / 255
    if ratio:
        assert np.all(s < 2 * np.maximum(a, a.max() / ratio) * (1 + 1e-9)), "a step coarser than the rule allows"
        assert s.max() / s.min() <= 2 * ratio


def test_migrated_steps_do_not_saturate(case):
    """Migrated arm: the producer now emits h/s; its round-and-clip codes must cover h without clipping."""
    text, feeds, h, _ = case
    model, _ = _compile(case, "calibrate{rows=4096},migrate-steps{ratio=4}")
    gamma = const_array(next(n for n in parse(text).graph if n.op_type == "LayerNormalization").inputs[1])
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    s = gamma.astype(np.float64) / const_array(norm.inputs[1])  # 1/s was folded into γ
    cast = next(n for n in model.graph if n.op_type == "Cast" and n.name.endswith("act_q"))
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0] is cast.outputs[0])
    z = const_array(dq.inputs[2]).astype(np.float64)
    rnd = next(n for n in model.graph if n.op_type == "Round")
    model.graph.outputs.extend([cast.outputs[0], rnd.inputs[0]])
    outs = [ort_outputs(model, f) for f in feeds]
    codes = np.concatenate([o[1].reshape(-1, C) for o in outs])
    scaled = np.concatenate([o[2].reshape(-1, C) for o in outs]).astype(np.float64)
    np.testing.assert_allclose(scaled * s, h, rtol=1e-4, atol=1e-5)  # the producer really emits h/s
    _assert_no_saturation(h, s, z)
    np.testing.assert_array_equal(codes, np.clip(np.round(scaled) + z, 0, 255))


def test_migrated_and_kept_steps_agree(case):
    kept, _ = _compile(case, "calibrate{rows=4096},migrate-steps{migrate=false,ratio=4}")
    ql = next(n for n in kept.graph if n.op_type == "QuantizeLinear")
    moved, _ = _compile(case, "calibrate{rows=4096},migrate-steps{ratio=4}")
    norm = next(n for n in moved.graph if n.op_type == "LayerNormalization")
    gamma_moved = const_array(norm.inputs[1]).astype(np.float64)
    text_gamma = const_array(next(n for n in kept.graph if n.op_type == "LayerNormalization").inputs[1])
    np.testing.assert_allclose(text_gamma / gamma_moved, const_array(ql.inputs[1]), rtol=1e-6)


def test_linear_producers_migrated_equal_kept_on_a_biased_decoder():
    """V→O and up→down groups (and V's bias): steps folded into the previous linear give the same integer
    codes as steps kept in the quantizers (powers of two: exact), so the outputs agree to float rounding."""
    from lowbit_models import rel_err
    from test_rotate_bias import CFG, qwen_like

    rng = np.random.default_rng(0)
    feeds = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 12)).astype(np.int64)} for _ in range(3)]
    outs = {}
    for migrate in (True, False):
        ctx = CompileContext(calibration=feeds, show_progress=False)
        pm = PassManager.from_pipeline(f"calibrate{{rows=256}},migrate-steps{{migrate={str(migrate).lower()},ratio=8}}",
                                       ctx)
        model = pm.run(qwen_like())
        outs[migrate] = ort_outputs(model, feeds[0])[0]
        if migrate:
            assert pm.passes[1].stats["migrated_linear"] == 2 * CFG.n_layers  # V→O and up→down per layer
    assert rel_err(outs[True], outs[False]) <= 1e-5


def _reference_errors(h, w, ratios):
    lo, hi = np.minimum(h.min(0), 0), np.maximum(h.max(0), 0)
    a = (hi - lo) / 255
    errors = {}
    for r in ratios:
        s = np.exp2(np.ceil(np.log2(np.maximum(a, a.max() / r))))
        z = np.clip(np.round(-lo / s), 0, 255)
        xq = np.clip(np.round(h / s) + z, 0, 255) - z
        ws = (w * s[:, None]).astype(np.float32)
        sw = np.abs(ws).max(0) / np.float32(127)
        wq = np.clip(np.round(ws / sw), -127, 127)
        errors[r] = float(((h @ w - (xq @ wq) * sw) ** 2).sum())
    return errors


GRID = [2 ** k for k in range(11)]  # the documented search grid {1, 2, …, 2^10}


def test_ratio_search_picks_the_reference_minimum(case):
    """ρ from {1, 2, …, 2^10} minimising the W8A8 output error on the calibration rows (numpy reference)."""
    _, _, h, w = case
    errors = _reference_errors(h, w, GRID)
    best = min(errors.values())
    _, ctx = _compile(case, "calibrate{rows=4096},migrate-steps")
    chosen = ctx.report["migrate-steps"]["ratio"]["min"]
    assert errors[chosen] <= best * 1.001, f"chose ρ={chosen}; reference errors {errors}"
    assert max(errors.values()) > 1.05 * best, "the case must make the choice matter"


def test_ratio_search_stops_at_the_top_of_its_grid(wide_case):
    """Where a larger ρ would still lower the error, the search takes the top of its documented grid, 2^10 —
    not a ρ outside it (a grid one longer or shorter picks another ρ here)."""
    _, _, h, w = wide_case
    errors = _reference_errors(h, w, [2 ** k for k in range(15)])
    assert min(errors, key=errors.get) > 2 ** 10 and errors[2 ** 10] > 1.5 * errors[2 ** 11] \
        and errors[2 ** 9] > 1.5 * errors[2 ** 10], "the case must put the optimum beyond the grid"
    _, ctx = _compile(wide_case, "calibrate{rows=4096},migrate-steps")
    assert ctx.report["migrate-steps"]["ratio"]["min"] == 2 ** 10


def test_v_to_o_steps_do_not_saturate_and_are_shared_per_kv_channel():
    """The kept arm of a V→O group with GQA, on its own terms: O's input measured in ORT (float model) must
    not saturate the per-channel quantizer, and O channels reading one V channel share its step (the step
    is folded into that one V column in the migrated arm)."""
    import onnx

    from lowbit.ir.analysis import find_linears
    from lowbit.ir.sessions import make_session, to_proto
    from test_rotate_bias import CFG, qwen_like

    rng = np.random.default_rng(0)
    feeds = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 12)).astype(np.int64)} for _ in range(3)]
    model = qwen_like()
    o = next(lin for lin in find_linears(model.graph) if lin.name.endswith("attn.o_proj"))
    x_name, width = o.input.name, o.shape[0]
    proto = to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, None))
    sess = make_session(proto, optimize=False)
    xs = np.concatenate([sess.run([x_name], f)[0].reshape(-1, width) for f in feeds]).astype(np.float64)
    ctx = CompileContext(calibration=feeds, show_progress=False)
    kept = PassManager.from_pipeline("calibrate{rows=256},migrate-steps{migrate=false,ratio=8}", ctx).run(model)
    ql = next(n for n in kept.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == x_name)
    s, z = const_array(ql.inputs[1]).astype(np.float64), const_array(ql.inputs[2]).astype(np.float64)
    _assert_no_saturation(xs, s, z)
    hd = CFG.dim // CFG.n_heads
    per_head = s.reshape(CFG.n_kv_heads, CFG.n_heads // CFG.n_kv_heads, hd)
    np.testing.assert_array_equal(per_head, np.broadcast_to(per_head[:, :1], per_head.shape))
    assert np.unique(s).size > 1, "the case must have per-channel steps"


@pytest.mark.parametrize("margin", [1.5, 3.0])
def test_margin_leaves_headroom_beyond_the_calibrated_range(case, margin):
    """``margin=m``: the quantizer covers the calibrated data scaled by m without saturating (text that
    exceeds the calibration's range by up to m), and its steps follow the balancing rule on m·range."""
    _, _, h, _ = case
    model, _ = _compile(case, f"calibrate{{rows=4096}},migrate-steps{{migrate=false,ratio=4,margin={margin}}}")
    ql = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    s, z = const_array(ql.inputs[1]).astype(np.float64), const_array(ql.inputs[2]).astype(np.float64)
    _assert_no_saturation(margin * h, s, z)
    lo, hi = np.minimum(h.min(0), 0), np.maximum(h.max(0), 0)
    a = margin * (hi - lo) / 255
    assert np.all(s >= a * (1 - 1e-9)) and np.all(s < 2 * np.maximum(a, a.max() / 4) * (1 + 1e-9))
    plain, _ = _compile(case, "calibrate{rows=4096},migrate-steps{migrate=false,ratio=4}")
    ql1 = next(n for n in plain.graph if n.op_type == "QuantizeLinear")
    with pytest.raises(AssertionError, match="saturates"):  # without the margin the scaled data clips
        _assert_no_saturation(margin * h, const_array(ql1.inputs[1]).astype(np.float64),
                              const_array(ql1.inputs[2]).astype(np.float64))
