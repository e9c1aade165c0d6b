"""Before/Expected structural tests, one block per pass, models written as ONNX text.

``expect(Before, pipeline, Expected)``: Expected is ONNX text (the same ops, in order, wired the
same way), ``"same"`` (must not fire: byte-identical serialized model) or an exception (must
refuse).  Idempotence: a second run changes nothing.  Numbers are checked by the reference tests
(test_*_reference.py); here only the shape of the rewrite.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import LowbitError, PassFailure, PipelineError
from lowbit.passmanager.manager import CompileContext, PassManager, registered_passes
from onnx_text import digest, expect, parse, run, structure

W = "float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, 3.0, 0.0, 2.0, -0.5, 1.5, 1.0}"
NORM_LINEAR = f"""
g (float[b, 4] x) => (float[b, 3] y)
<float[4] gamma = {{1.0, 2.0, 0.5, 1.5}}, {W}>
{{
    h = RMSNormalization <axis = -1> (x, gamma)
    y = MatMul (h, w)
}}"""
UNIT_NORM = NORM_LINEAR.replace("{1.0, 2.0, 0.5, 1.5}", "{1.0, 1.0, 1.0, 1.0}")
NORM_FEEDS_RELU = f"""
g (float[b, 4] x) => (float[b, 3] y, float[b, 4] r)
<float[4] gamma = {{1.0, 2.0, 0.5, 1.5}}, {W}>
{{
    h = RMSNormalization <axis = -1> (x, gamma)
    y = MatMul (h, w)
    r = Relu (h)
}}"""
LAYERNORM_STREAM = f"""
g (int64[b, t] ids) => (float[b, t, 4] y)
<float[6, 4] e = {{{", ".join(str(float(i % 5) - 2) for i in range(24))}}}, float[4] gamma = {{1.0, 1.0, 1.0, 1.0}},
 float[4] beta = {{0.0, 0.0, 0.0, 0.0}}, float[4, 4] wo = {{{", ".join(str(0.1 * i) for i in range(16))}}}>
{{
    x = Gather (e, ids)
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    a = MatMul (h, wo)
    y = Add (x, a)
}}"""
FEEDS = [{"x": np.array([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, -1.0, 2.0], [2.0, 0.5, -0.5, 1.0]], np.float32)}]


def _ctx(**kw):
    return CompileContext(calibration=FEEDS, probes=FEEDS, show_progress=False, **kw)


def _twice_is_same(text, pipeline, ctx=None):
    model, _ = run(parse(text), pipeline, ctx or _ctx())
    before = digest(model)
    model, pm = run(model, pipeline, ctx or _ctx())
    assert digest(model) == before, f"a second '{pipeline}' changed the model"
    return pm


# fold-norms -------------------------------------------------------------------------------------
def test_fold_norms_fires():
    expect(NORM_LINEAR, "fold-norms", NORM_LINEAR)  # same structure: γ → 1 and W → diag(γ)·W


def test_fold_norms_must_not_fire_on_unit_scale_or_shared_norm():
    expect(UNIT_NORM, "fold-norms", "same")
    expect(NORM_FEEDS_RELU, "fold-norms", "same")


def test_fold_norms_is_idempotent():
    _twice_is_same(NORM_LINEAR, "fold-norms")


# smooth -----------------------------------------------------------------------------------------
def test_smooth_fires_without_leaving_a_mul():
    expect(NORM_LINEAR, "calibrate,smooth", NORM_LINEAR, _ctx())


def test_smooth_must_not_fire_where_the_producer_feeds_other_ops():
    expect(NORM_FEEDS_RELU, "calibrate,smooth", "same", _ctx())


def test_smooth_must_refuse():
    expect(NORM_LINEAR, "smooth", PipelineError, _ctx(), match="calibrated")
    expect(NORM_LINEAR, "calibrate,smooth{search=true}", PassFailure, _ctx(), match="rows")


# rotate -----------------------------------------------------------------------------------------
POST_NORM_STREAM = f"""
g (int64[b, t] ids) => (float[b, t, 4] y)
<float[6, 4] e = {{{", ".join(str(float(i % 5) - 2) for i in range(24))}}}, float[4] gamma = {{1.0, 1.0, 1.0, 1.0}},
 float[4] beta = {{0.0, 0.0, 0.0, 0.0}}, float[4, 4] wo = {{{", ".join(str(0.1 * i) for i in range(16))}}},
 float[4, 4] wf = {{{", ".join(str(0.05 * i - 0.3) for i in range(16))}}}>
{{
    x = Gather (e, ids)
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    a = MatMul (h, wo)
    s = Add (h, a)
    n = LayerNormalization <axis = -1> (s, gamma, beta)
    y = MatMul (n, wf)
}}"""


def test_rotate_must_refuse_post_norm_layernorm_and_non_unit_scales():
    """Pre-LN LayerNorm streams are rotated (Q fixes the ones vector); a post-norm one, where the norm's
    output is itself the residual stream, cannot take the inverse rotation."""
    expect(POST_NORM_STREAM, "rotate", PassFailure, match=r"node 'LayerNormalization'.*feeds something other than linears")
    expect(LAYERNORM_STREAM, "rotate", PassFailure, match="graph output")
    expect(NORM_LINEAR, "rotate", PassFailure, match="no token embedding")


# quantize-weights -------------------------------------------------------------------------------
QW_EXPECTED = """
g (float[b, 4] x) => (float[b, 3] y)
<float[4] gamma = {1.0, 2.0, 0.5, 1.5}, int8[4, 3] q = {0,0,0,0,0,0,0,0,0,0,0,0}, float[3] s = {1.0, 1.0, 1.0}>
{
    h = RMSNormalization <axis = -1> (x, gamma)
    wd = DequantizeLinear <axis = 1> (q, s)
    y = MatMul (h, wd)
}"""


def test_quantize_weights_fires():
    expect(NORM_LINEAR, "quantize-weights{bits=8,group=0}", QW_EXPECTED)


def test_quantize_weights_is_idempotent():
    _twice_is_same(NORM_LINEAR, "quantize-weights{bits=8,group=0}")


def test_quantize_weights_must_refuse_gptq_without_hessian():
    expect(NORM_LINEAR, "calibrate,quantize-weights{method=gptq}", PipelineError, _ctx(), match="hessian")


# quantize (W8A8) --------------------------------------------------------------------------------
Q_STATIC = """
g (float[b, 4] x) => (float[b, 3] y)
<float[4] gamma = {1.0, 2.0, 0.5, 1.5}, int8[4, 3] q = {0,0,0,0,0,0,0,0,0,0,0,0}, float[3] s = {1.0, 1.0, 1.0},
 float sa = {1.0}, uint8 za = {0}>
{
    h = RMSNormalization <axis = -1> (x, gamma)
    wd = DequantizeLinear <axis = 1> (q, s)
    hq = QuantizeLinear (h, sa, za)
    hd = DequantizeLinear (hq, sa, za)
    y = MatMul (hd, wd)
}"""


def test_quantize_static_fires():
    expect(NORM_LINEAR, "calibrate,quantize{mode=static}", Q_STATIC, _ctx())


def test_quantize_must_refuse_a_model_without_linears():
    relu = "g (float[b, 4] x) => (float[b, 4] y) { y = Relu (x) }"
    expect(relu, "quantize{mode=dynamic}", PassFailure, match="no linear layer")


# quantize-acts ----------------------------------------------------------------------------------
def test_quantize_acts_must_not_fire_on_excluded_or_weightless_matmuls():
    def name_it(model):
        next(n for n in model.graph if n.op_type == "MatMul").name = "lm_head"

    expect(NORM_LINEAR, "quantize-acts", "same", prepare=name_it)  # excluded by default
    two_inputs = "g (float[b, 4] x, float[4, 3] w) => (float[b, 3] y) { y = MatMul (x, w) }"
    expect(two_inputs, "quantize-acts", "same")


def test_quantize_acts_static_must_refuse_without_statistics():
    expect(NORM_LINEAR, "quantize-acts{bits=8,static=true}", PipelineError, match="calibrated")


# migrate-steps / dyadic / integer-lut -----------------------------------------------------------
def test_migrate_steps_must_refuse_without_statistics():
    expect(NORM_LINEAR, "migrate-steps", PipelineError, match="calibrated")


def test_dyadic_must_refuse_float_linears():
    expect(NORM_LINEAR, "dyadic", PassFailure, _ctx(properties={"quantized"}), match="no quantized linear")


def test_integer_lut_must_not_fire_on_float_activations():
    relu = "g (float[b, 4] x) => (float[b, 4] y) { y = Relu (x) }"
    expect(relu, "integer-lut", "same", _ctx(properties={"quantized"}))


# quantize-embeddings / calibrate / canonicalize -------------------------------------------------
EMB = f"""
g (int64[b, t] ids) => (float[b, t, 4] y)
<float[300, 4] e = {{{", ".join(str(float(i % 7) - 3) for i in range(1200))}}}>
{{ y = Gather (e, ids) }}"""
EMB_EXPECTED = """
g (int64[b, t] ids) => (float[b, t, 4] y)
<int8[300, 4] q = {%s}, float[300] s = {%s}, int64[1] ax = {-1}>
{
    r = Gather <axis = 0> (q, ids)
    sc = Gather <axis = 0> (s, ids)
    su = Unsqueeze (sc, ax)
    rf = Cast <to = 1> (r)
    y = Mul (rf, su)
}""" % (", ".join(["0"] * 1200), ", ".join(["1.0"] * 300))


def test_quantize_embeddings_fires_and_skips_small_tables():
    expect(EMB, "quantize-embeddings", EMB_EXPECTED)
    expect(EMB, "quantize-embeddings{min_rows=301}", "same")
    _twice_is_same(EMB, "quantize-embeddings")


def test_calibrate_changes_no_node():
    expect(NORM_LINEAR, "calibrate", "same", _ctx())
    expect(NORM_LINEAR, "calibrate", LowbitError, CompileContext(), match="calibration samples")


GEMM = f"""
g (float[2, 4] x) => (float[2, 3] y)
<{W}, float[3] c = {{0.5, -1.0, 2.0}}>
{{ y = Gemm (x, w, c) }}"""
GEMM_EXPECTED = f"""
g (float[2, 4] x) => (float[2, 3] y)
<{W}, float[3] c = {{0.5, -1.0, 2.0}}>
{{
    m = MatMul (x, w)
    y = Add (m, c)
}}"""


def test_canonicalize_gemm_to_matmul_and_leaves_canonical_graphs():
    expect(GEMM, "canonicalize{norms=false}", GEMM_EXPECTED)
    out, _ = run(parse(NORM_LINEAR), "canonicalize")
    assert structure(out) == structure(parse(NORM_LINEAR))
    _twice_is_same(GEMM, "canonicalize", CompileContext(show_progress=False))


@pytest.mark.parametrize("pipeline", ["fold-norms", "quantize-weights{bits=4,group=0}", "calibrate"])
def test_passes_preserve_graph_io(pipeline):
    model, _ = run(parse(NORM_LINEAR), pipeline, _ctx())
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]


def test_assign_bits_replaying_its_own_plan_changes_nothing(tmp_path):
    plan = tmp_path / "plan.json"
    pipeline = f"calibrate{{hessian=true}},assign-bits{{budget=nominal_bits,target=6,bits=4:8,groups=0,save={plan}}}"
    model, _ = run(parse(NORM_LINEAR), pipeline, _ctx())
    before = digest(model)
    model, pm = run(model, f"assign-bits{{plan={plan}}}", _ctx())
    assert digest(model) == before and pm.ctx.report["passes"][-1]["modified"] is False


def test_smooth_leaves_a_norm_with_a_non_constant_scale_and_says_why():
    """γ fed at run time cannot absorb 1/s: the group must not fire, and the report names the layer
    and the reason (a refusal here would block w8a8-dynamic on exports whose γ is computed)."""
    text = """
    g (float[b, 4] x, float[4] gamma) => (float[b, 3] y)
    <float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, 3.0, 0.0, 2.0, -0.5, 1.5, 1.0}>
    {
        h = RMSNormalization <axis = -1> (x, gamma)
        y = MatMul (h, w)
    }"""
    feeds = [dict(FEEDS[0], gamma=np.ones(4, np.float32))]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    out = expect(text, "calibrate,smooth", "same", ctx)
    assert out is not None
    (entry,) = ctx.report["smooth"]["unsmoothed"]
    assert "scale is not a constant" in entry["reason"]


def test_quantize_weights_tags_the_layers_it_quantized():
    out = expect(NORM_LINEAR, "quantize-weights{bits=8,group=0}", QW_EXPECTED)
    mm = next(n for n in out.graph if n.op_type == "MatMul")
    assert (mm.metadata_props["lowbit.bits"], mm.metadata_props["lowbit.group"]) == ("8", "0")


@pytest.mark.parametrize("pipeline", ["quantize-weights{damp=1.0}", "quantize-weights{damp=-0.1}",
                                      "quantize-weights{bits=5}", "quantize-weights{group=48}",
                                      "quantize-embeddings{min_rows=0}", "migrate-steps{ratio=3}",
                                      "dyadic{mult_bits=31}", "quantize{percentile=40}"])
def test_bad_options_must_refuse(pipeline):
    with pytest.raises(PipelineError):
        PassManager.from_pipeline(pipeline, CompileContext())


@pytest.mark.parametrize("name", sorted(registered_passes()))
def test_every_pass_has_frozen_options(name):
    import dataclasses

    options = registered_passes()[name]().options
    assert dataclasses.is_dataclass(options)
    if dataclasses.fields(options):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(options, dataclasses.fields(options)[0].name, None)


# every pass: no stale name cache left in the model ------------------------------------------------
@pytest.mark.parametrize("pipeline", ["quantize-acts", "fold-norms", "calibrate,quantize", "quantize-weights",
                                      "canonicalize", "calibrate{rows=64},migrate-steps",
                                      "calibrate{rows=64},migrate-steps,dyadic"])
def test_a_pass_leaves_no_name_cache_behind(pipeline):
    """Passes name new values through a cache of taken names; the model handed back must not keep it: a node added
    afterwards by other code (a user's edit, a backend) is not in a stale cache, and the next pass's fresh name
    would then collide with it."""
    import onnx_ir as ir

    from lowbit.ir.rewrite import unique_name

    model, _ = run(parse(NORM_LINEAR), pipeline, _ctx())
    graph = model.graph
    out = graph.outputs[0]
    node = ir.Node("", "Identity", [out], outputs=[ir.Value(name="added_later")], name="added_later_node")
    graph.append(node)
    assert unique_name(graph, "added_later") != "added_later"
    assert unique_name(graph, "added_later_node") != "added_later_node"
