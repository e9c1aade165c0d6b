"""SmoothQuant against the paper's formula, in plain numpy (Xiao et al. 2023, eq. 4):
``s_j = max|X_j|^α / max|W_j|^(1−α)``, the α search's choice against a reference W8A8 error, and
the folds (1/s into the norm's γ, s into the weight rows).  Float equivalence alone holds for any s,
so these tests pin the method itself: a swapped α/(1−α) or a search returning the worst α fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.analysis import const_array, find_linears
from lowbit.passmanager.manager import CompileContext
from onnx_text import parse, run

C, N1, N2, EPS = 16, 12, 8, 1e-6
GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _text(gamma, w1, w2):
    def lit(a):
        return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))

    return f"""
    g (float[b, t, {C}] x) => (float[b, t, {N1}] y1, float[b, t, {N2}] y2)
    <float[{C}] gamma = {{{lit(gamma)}}}, float[{C}, {N1}] w1 = {{{lit(w1)}}}, float[{C}, {N2}] w2 = {{{lit(w2)}}}>
    {{
        h = RMSNormalization <axis = -1, epsilon = {EPS}> (x, gamma)
        y1 = MatMul (h, w1)
        y2 = MatMul (h, w2)
    }}"""


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(3)
    gamma = (0.5 + rng.random(C)).astype(np.float32)
    gamma[[2, 9]] = [8.0, 5.0]  # outlier channels, as SmoothQuant's activations have
    w1 = (rng.standard_normal((C, N1)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((C, N2)) * 0.3).astype(np.float32)
    w2[4] *= 6  # a loud weight row
    feeds = [{"x": rng.standard_normal((1, 24, C)).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([f["x"].reshape(-1, C) for f in feeds]).astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * gamma  # RMSNorm, written out
    return _text(gamma, w1, w2), feeds, h, gamma, w1, w2


def reference_scales(h, w1, w2, alpha):
    xmax = np.abs(h).max(axis=0)
    wmax = np.maximum(np.abs(w1).max(axis=1), np.abs(w2).max(axis=1))  # consumers share one s
    return xmax ** alpha / wmax ** (1 - alpha)


def w8a8_error(h, weights, s, fit=None):
    """Static per-tensor uint8 activations (range from the rows ``fit``, default ``h``) × per-output-channel
    int8 weights, after smoothing by s."""
    x = h / s
    ranged = x if fit is None else fit / s
    lo, hi = min(ranged.min(), 0.0), max(ranged.max(), 0.0)
    step = (hi - lo) / 255
    zp = np.round(-lo / step)
    xq = (np.clip(np.round(x / step) + zp, 0, 255) - zp) * step
    total = 0.0
    for w in weights:
        ws = w.astype(np.float64) * s[:, None]
        sw = np.abs(ws).max(axis=0) / 127
        wq = np.round(ws / sw) * sw
        total += float(((h @ w - xq @ wq) ** 2).sum())
    return total


def _smoothed(case, pipeline):
    text, feeds, *_ = case
    ctx = CompileContext(calibration=feeds, probes=feeds[:2], show_progress=False)
    model, _ = run(parse(text), pipeline, ctx)
    return model, ctx


def _applied_scales(model, w1):
    lin = next(lin for lin in find_linears(model.graph) if lin.weight.const_value.shape[1] == N1)
    return lin.weight.const_value.numpy().astype(np.float64)[:, 0] / w1[:, 0]


@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_scales_follow_the_paper(case, alpha):
    _, _, h, gamma, w1, w2 = case
    model, _ = _smoothed(case, f"calibrate,smooth{{alpha={alpha}}}")
    s = _applied_scales(model, w1)
    np.testing.assert_allclose(s, reference_scales(h, w1, w2, alpha), rtol=1e-4)
    norm = next(n for n in model.graph if n.op_type == "RMSNormalization")
    np.testing.assert_allclose(const_array(norm.inputs[1]), gamma / s, rtol=1e-4)  # 1/s into γ
    lin2 = next(lin for lin in find_linears(model.graph) if lin.weight.const_value.shape[1] == N2)
    np.testing.assert_allclose(lin2.weight.const_value.numpy(), w2 * s[:, None], rtol=1e-4)  # shared s
    assert not any(n.op_type == "Mul" for n in model.graph), "no Mul node is left behind"


def test_a_swapped_exponent_is_distinguishable(case):
    """The reference has power: α and 1−α give scales far apart on this case."""
    _, _, h, _, w1, w2 = case
    a, b = reference_scales(h, w1, w2, 0.75), reference_scales(h, w1, w2, 0.25)
    assert np.max(np.abs(a / b - 1)) > 0.5


def held_out_reference(h, w1, w2, alpha):
    """Two-fold: s (or no smoothing, alpha None) and the activation range from even rows, error on odd, and back."""
    total = 0.0
    for fit, test in ((h[0::2], h[1::2]), (h[1::2], h[0::2])):
        s = np.ones(C) if alpha is None else reference_scales(fit, w1, w2, alpha)
        total += w8a8_error(test, [w1, w2], s, fit)
    return total


def test_alpha_search_picks_the_reference_minimum(case):
    _, _, h, _, w1, w2 = case
    errors = {a: held_out_reference(h, w1, w2, a) for a in (None, *GRID)}
    ranked = sorted(errors, key=errors.get)
    assert ranked[0] is not None, "on outliers some α must beat no smoothing"
    assert errors[ranked[1]] > 1.01 * errors[ranked[0]], "the case must have a clear winner"
    model, ctx = _smoothed(case, "calibrate{rows=100000},smooth{search=true}")
    chosen = ctx.report["smooth"]["alpha"]["mean"]
    assert chosen == ranked[0], f"chose α={chosen}; reference errors {errors}"
    np.testing.assert_allclose(_applied_scales(model, w1), reference_scales(h, w1, w2, ranked[0]), rtol=1e-4)


def test_alpha_search_leaves_a_group_unsmoothed_where_no_alpha_helps_on_unseen_rows():
    """No outliers (γ = 1, plain Gaussian rows): smoothing by the calibration's own channel maxima pushes every
    channel to the edge of the range, so unseen rows clip; the held-out reference prefers no smoothing, and so
    must the search (the layers listed as unsmoothed, the weights untouched)."""
    rng = np.random.default_rng(5)
    gamma = np.ones(C, np.float32)
    w1 = (rng.standard_normal((C, N1)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((C, N2)) * 0.3).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 24, C)).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([f["x"].reshape(-1, C) for f in feeds]).astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    errors = {a: held_out_reference(h, w1, w2, a) for a in (None, *GRID)}
    assert min(errors, key=errors.get) is None, f"the case must prefer no smoothing: {errors}"
    model, ctx = _smoothed((_text(gamma, w1, w2), feeds), "calibrate{rows=100000},smooth{search=true}")
    assert {u["reason"] for u in ctx.report["smooth"]["unsmoothed"]} == {
        "no α lowers its held-out W8A8 error (smooth{search=true})"}
    assert len(ctx.report["smooth"]["unsmoothed"]) == 2 and "alpha" not in ctx.report["smooth"]
    np.testing.assert_array_equal(_applied_scales(model, w1), np.ones(C))


def test_smoothing_then_w8a8_beats_no_smoothing_on_outliers(case):
    """The point of the method on this case, measured by the reference simulator."""
    _, _, h, _, w1, w2 = case
    best = min(w8a8_error(h, [w1, w2], reference_scales(h, w1, w2, a)) for a in GRID)
    assert best < 0.8 * w8a8_error(h, [w1, w2], np.ones(C))


def test_alpha_search_on_a_row_sample_of_many_tokens_scales_from_all_of_them(case):
    """Rows sampled from ≥ 2× as many tokens: s from every token's max|X|, the error on the rows in sample."""
    from lowbit.quant.stats import act_stats

    text, feeds, _, gamma, w1, w2 = case
    rng = np.random.default_rng(7)
    more = feeds + [{"x": rng.standard_normal((1, 24, C)).astype(np.float32)} for _ in range(4)]  # 192 tokens
    x = np.concatenate([f["x"].reshape(-1, C) for f in more]).astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * gamma
    calibrated, _ = _smoothed((text, more), "calibrate{rows=64}")
    norm = next(n for n in calibrated.graph if n.op_type == "RMSNormalization")
    rows = act_stats(norm.outputs[0]).rows.astype(np.float64)  # the row sample the search sees
    assert rows.shape == (64, C)
    errors = {a: w8a8_error(rows, [w1, w2], np.ones(C) if a is None else reference_scales(h, w1, w2, a))
              for a in (None, *GRID)}
    best = min(errors, key=errors.get)
    model, ctx = _smoothed((text, more), "calibrate{rows=64},smooth{search=true}")
    assert ctx.report["smooth"]["alpha"]["mean"] == best, f"reference errors {errors}"
    np.testing.assert_allclose(_applied_scales(model, w1), reference_scales(h, w1, w2, best), rtol=1e-4)


def test_alpha_search_reaches_the_bottom_of_its_grid():
    """Loud weight rows (three rows ×20) next to loud activation channels: shifting difficulty onto the weights
    costs more than it saves, so the held-out reference's minimum is the grid's smallest α, 0.3 — and the search
    must pick exactly that α (a grid whose bottom moved picks another)."""
    rng = np.random.default_rng(4)
    gamma = (0.5 + rng.random(C)).astype(np.float32)
    gamma[[2, 9]] = [8.0, 5.0]
    w1 = (rng.standard_normal((C, N1)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((C, N2)) * 0.3).astype(np.float32)
    w1[[4, 7, 11]] *= 20
    w2[[4, 7, 11]] *= 20
    feeds = [{"x": rng.standard_normal((1, 24, C)).astype(np.float32)} for _ in range(4)]
    x = np.concatenate([f["x"].reshape(-1, C) for f in feeds]).astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * gamma
    errors = {a: held_out_reference(h, w1, w2, a) for a in (None, *GRID)}
    ranked = sorted(errors, key=errors.get)
    assert ranked[0] == GRID[0] and errors[ranked[1]] > 1.2 * errors[ranked[0]], errors
    model, ctx = _smoothed((_text(gamma, w1, w2), feeds), "calibrate{rows=100000},smooth{search=true}")
    assert ctx.report["smooth"]["alpha"]["mean"] == GRID[0]
    np.testing.assert_allclose(_applied_scales(model, w1), reference_scales(h, w1, w2, GRID[0]), rtol=1e-4)
