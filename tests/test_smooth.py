"""smooth: float equivalence on both real models, no Mul left behind, fold targets, contracts."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session


def _run(model, pipeline, feeds):
    ctx = CompileContext(calibration=feeds, show_progress=False)
    pm = PassManager.from_pipeline(pipeline, ctx)
    return pm.run(model), pm


def _outputs(model, feeds):
    sess = make_session(model, optimize=False)
    return [sess.run(None, f)[0] for f in feeds]


def _assert_close(before, after, rtol):
    for b, a in zip(before, after):
        assert np.max(np.abs(a.astype(np.float64) - b)) <= rtol * np.max(np.abs(b))


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_stories260k_is_float_equivalent(stories_model, stories_calibration, alpha):
    feeds = stories_calibration[:3]
    before = _outputs(stories_model, feeds)
    ops_before = collections.Counter(n.op_type for n in stories_model.graph)
    model, pm = _run(stories_model, f"calibrate,smooth{{alpha={alpha}}}", stories_calibration[:8])
    assert pm.passes[1].stats["groups_norm"] == 11 and pm.passes[1].stats["groups_linear"] == 10
    assert collections.Counter(n.op_type for n in model.graph) == ops_before  # no Mul left behind
    _assert_close(before, _outputs(model, feeds), 1e-5)


def test_smoothing_minilm_is_float_equivalent(minilm_model, minilm_calibration):
    feeds = minilm_calibration[:2]
    before = _outputs(minilm_model, feeds)
    model, pm = _run(minilm_model, "calibrate,smooth{alpha=0.5}", minilm_calibration[:4])
    assert pm.passes[1].stats["groups_linear"] == 6  # V→O; LayerNorms also feed residuals
    _assert_close(before, _outputs(model, feeds), 1e-5)


def test_smoothing_flattens_activation_outliers(stories_model, stories_calibration):
    from lowbit.ir.analysis import find_linears
    from lowbit.quant.stats import act_stats

    model, _ = _run(stories_model, "calibrate", stories_calibration[:8])
    down = next(lin for lin in find_linears(model.graph) if lin.name == "layers.2.mlp.down_proj")
    ratio_before = act_stats(down.input).absmax.max() / np.median(act_stats(down.input).absmax)
    PassManager.from_pipeline("smooth{alpha=0.5}", CompileContext(properties={"calibrated"})).run(model)
    ratio_after = act_stats(down.input).absmax.max() / np.median(act_stats(down.input).absmax)
    assert ratio_after < ratio_before / 2


@pytest.mark.parametrize("which", ["linears=false", "norms=false"])
def test_smoothing_twice_at_half_alpha_changes_nothing(stories_model, stories_calibration, which):
    # With α = 1/2 the second round sees |X|/s and s·|W|, so s' = 1.  (With both kinds of group
    # on, the norm group and V→O share v_proj's weight, so a second round is not exactly 1.)
    model, _ = _run(stories_model, f"calibrate,smooth{{alpha=0.5,{which}}}", stories_calibration[:4])
    snapshot = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    PassManager.from_pipeline(f"smooth{{alpha=0.5,{which}}}",
                              CompileContext(properties={"calibrated"})).run(model)
    for name, arr in snapshot.items():
        np.testing.assert_allclose(model.graph.initializers[name].const_value.numpy(), arr, rtol=1e-5)


_BEFORE = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] x) => (float[N, 3] y, float[N, 3] z) <float[4] gamma = {1.0, 2.0, 0.5, 1.5},
    float[4] beta = {0.1, 0.0, -0.2, 0.3}, float[4, 3] w = {1,2,3,4,5,6,7,8,9,10,11,12},
    float[4, 3] u = {1,0,0,0,1,0,0,0,1,1,1,1}> {
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    y = MatMul (h, w)
    z = MatMul (h, u)
}
"""


def _text_model(text):
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def test_layernorm_group_folds_into_gamma_and_beta():
    model = _text_model(_BEFORE)
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32) * [1, 10, 0.1, 3]
    x = x.astype(np.float32)
    feeds = [{"x": x}]
    before = make_session(model).run(None, feeds[0])
    model, pm = _run(model, "calibrate,smooth{alpha=0.5}", feeds)
    assert pm.passes[1].stats["groups_norm"] == 1
    gamma = model.graph.initializers["gamma"].const_value.numpy()
    beta = model.graph.initializers["beta"].const_value.numpy()
    w = model.graph.initializers["w"].const_value.numpy()
    s = np.array([1.0, 2.0, 0.5, 1.5]) / gamma
    np.testing.assert_allclose(beta * s, [0.1, 0.0, -0.2, 0.3], rtol=1e-6)  # β scaled by the same 1/s
    np.testing.assert_allclose(w / s[:, None], np.arange(1, 13).reshape(4, 3), rtol=1e-5)
    after = make_session(model).run(None, feeds[0])
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_must_not_fire_when_the_norm_also_feeds_a_residual():
    text = _BEFORE.replace("z = MatMul (h, u)", "z = Add (h, x)").replace("float[N, 3] z", "float[N, 4] z")
    model = _text_model(text)
    feeds = [{"x": np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)}]
    expected = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    model, pm = _run(model, "calibrate,smooth", feeds)
    assert pm.passes[1].stats["skipped"] == 1
    for name, arr in expected.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), arr)


def test_alpha_search_picks_per_group_alphas_and_stays_float_equivalent(stories_model, stories_calibration):
    feeds = stories_calibration[:2]
    before = _outputs(stories_model, feeds)
    ctx = CompileContext(calibration=stories_calibration[:8], show_progress=False)
    model = PassManager.from_pipeline("calibrate{rows=256},smooth{search=true}", ctx).run(stories_model)
    alphas = ctx.report["smooth"]["alpha"]
    assert 0.3 <= alphas["min"] <= alphas["max"] <= 0.9
    _assert_close(before, _outputs(model, feeds), 1e-5)


def test_alpha_search_without_rows_is_refused(stories_model, stories_calibration):
    from lowbit.errors import PassFailure

    with pytest.raises(PassFailure, match="calibrate\\{rows=512\\}"):
        _run(stories_model, "calibrate,smooth{search=true}", stories_calibration[:2])


def test_a_group_without_statistics_is_reported_unsmoothed_not_a_crash():
    """A linear whose input has no statistics (calibration never reached it) keeps its weights; the report names
    it with the reason, and the other groups are still smoothed."""
    from lowbit.quant.stats import META_KEY

    model = _text_model(_BEFORE)
    feeds = [{"x": (np.random.default_rng(0).standard_normal((32, 4)) * [1, 10, 0.1, 3]).astype(np.float32)}]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    model = PassManager.from_pipeline("calibrate", ctx).run(model)
    lin = next(n for n in model.graph if n.op_type == "MatMul")
    lin.inputs[0].meta.pop(META_KEY)
    w = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    pm = PassManager.from_pipeline("smooth{alpha=0.5}", ctx)
    model = pm.run(model)
    rows = ctx.report["smooth"]["unsmoothed"]
    assert pm.passes[0].stats["skipped"] >= 1
    assert any(r["reason"] == "no calibration statistics for its input" for r in rows), rows
    np.testing.assert_array_equal(model.graph.initializers[lin.inputs[1].name].const_value.numpy(),
                                  w[lin.inputs[1].name])
