"""The verify instrument fires: toy passes that lie about ``modified``, their ensured properties, the
properties they break, or float equivalence are caught — in a pipeline and when called on their own."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import PassFailure
from lowbit.ir.analysis import find_linears
from lowbit.ir.rewrite import make_node, set_input_const
from lowbit.passmanager.instruments import VerifyInstrument
from lowbit.passmanager.manager import CALIBRATED, QUANTIZED, CompileContext, Pass, PassManager, PassResult
from lowbit.passmanager.manager import registered_passes
from lowbit.passmanager.properties import Prop, check_property
from onnx_text import parse, run

MODEL = """
g (float[2, 4] x) => (float[2, 3] y)
<float[4] gamma = {1.0, 2.0, 0.5, 1.5},
 float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, 3.0, 0.0, 2.0, -0.5, 1.5, 1.0}>
{
    h = RMSNormalization <axis = -1> (x, gamma)
    y = MatMul (h, w)
}
"""
FEEDS = [{"x": np.array([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, -1.0, 2.0]], np.float32)}]


def _ctx():
    return CompileContext(calibration=FEEDS, probes=FEEDS, show_progress=False)


def _scale_weight(model, factor):
    lin = find_linears(model.graph)[0]
    set_input_const(model.graph, lin.node, 1, lin.weight.const_value.numpy() * factor)


class Honest(Pass):
    name = "toy-honest"

    def call(self, model):
        _scale_weight(model, 2.0)
        return PassResult(model, modified=True)


class SaysUnmodified(Honest):
    name = "toy-says-unmodified"

    def call(self, model):
        _scale_weight(model, 2.0)
        return PassResult(model, modified=False)


class SaysModified(Pass):
    name = "toy-says-modified"

    def call(self, model):
        return PassResult(model, modified=True)


class ClaimsQuantized(Honest):
    name = "toy-claims-quantized"
    ensures_properties = (QUANTIZED,)


class BreaksFloat(Honest):
    name = "toy-breaks-float"
    float_equivalent = True

    def call(self, model):
        _scale_weight(model, 1.001)
        return PassResult(model, modified=True)


class DropsStatistics(Pass):
    """Puts an Identity in front of the linear: its input is a new value without statistics."""

    name = "toy-drops-statistics"

    def call(self, model):
        lin = find_linears(model.graph)[0]
        node = make_node(model.graph, "Identity", [lin.input], origin=self.name, name="toy.id", before=lin.node)
        lin.node.replace_input_with(0, node.outputs[0])
        return PassResult(model, modified=True)


class DeclaresDropping(DropsStatistics):
    name = "toy-declares-dropping"
    invalidates_properties = (CALIBRATED,)


class MakesInvalid(Pass):
    """Feeds the MatMul from a value no node produces: the ONNX checker refuses the result."""

    name = "toy-makes-invalid"

    def call(self, model):
        import onnx_ir as ir

        lin = find_linears(model.graph)[0]
        lin.node.replace_input_with(0, ir.Value(name="dangling"))
        return PassResult(model, modified=True)


def _calibrated():
    model = parse(MODEL)
    model, _ = run(model, "calibrate", _ctx())
    return model


@pytest.mark.parametrize("toy, message", [
    (SaysUnmodified, "reported modified=False but the serialized model changed"),
    (SaysModified, "reported modified=True but the serialized model is unchanged"),
    (ClaimsQuantized, "declares it ensures 'quantized' but no linear layer reads quantized weights"),
    (BreaksFloat, "claims float equivalence but outputs changed"),
    (MakesInvalid, "produced an invalid model"),
], ids=["false-unmodified", "false-modified", "missing-ensures", "float-broken", "invalid"])
@pytest.mark.parametrize("how", ["manager", "direct"])
def test_a_lying_pass_is_caught(toy, message, how):
    ctx = _ctx()
    model = parse(MODEL)
    with pytest.raises(PassFailure, match=message):
        if how == "manager":
            PassManager([toy(ctx=ctx)], ctx).run(model)
        else:
            toy(ctx=ctx)(model)  # a pass called on its own goes through the default instruments too


def test_breaking_a_held_property_must_be_declared():
    ctx = _ctx()
    model = _calibrated()
    ctx.properties.add(CALIBRATED)
    with pytest.raises(PassFailure, match="broke 'calibrated' without declaring it"):
        PassManager([DropsStatistics(ctx=ctx)], ctx).run(model)
    model = _calibrated()
    PassManager([DeclaresDropping(ctx=ctx)], ctx).run(model)  # declared: fine
    assert check_property(CALIBRATED, model) is not None  # ... and it really is broken


def test_an_honest_pass_passes_and_is_recorded():
    ctx = _ctx()
    verify = VerifyInstrument()
    PassManager([Honest(ctx=ctx)], ctx, [verify]).run(parse(MODEL))
    assert verify.verified == ["toy-honest"]


def test_tests_run_every_pipeline_through_the_verifier():
    pm = PassManager.from_pipeline("fold-norms", CompileContext())
    assert any(isinstance(i, VerifyInstrument) for i in pm.instruments), "LOWBIT_VERIFY=1 must add verify-each"


def test_the_verifier_is_off_without_the_variable(monkeypatch):
    monkeypatch.setenv("LOWBIT_VERIFY", "0")
    pm = PassManager.from_pipeline("fold-norms", CompileContext())
    assert not any(isinstance(i, VerifyInstrument) for i in pm.instruments)
    SaysUnmodified(ctx=_ctx())(parse(MODEL))  # nobody checks: the lie goes through


def test_property_checkers_see_the_ir():
    model = parse(MODEL)
    assert "no calibration statistics" in check_property(CALIBRATED, model)
    assert check_property(Prop.HESSIAN, model) is not None
    model, _ = run(model, "calibrate{hessian=true}", _ctx())
    assert check_property(CALIBRATED, model) is None and check_property(Prop.HESSIAN, model) is None
    assert check_property(QUANTIZED, model) is not None
    model, _ = run(model, "quantize-weights{bits=8,group=0}", _ctx())
    assert check_property(QUANTIZED, model) is None


@pytest.mark.parametrize("name", sorted(registered_passes()))
def test_every_pass_declares_properties_as_enum_members(name):
    cls = registered_passes()[name]
    p = cls()
    for attr in ("requires_properties", "ensures_properties", "invalidates_properties"):
        for prop in getattr(p, attr):
            assert isinstance(prop, Prop), f"{name}.{attr} holds {prop!r}, not a Prop"


@pytest.mark.parametrize("pipeline, needs", [
    ("quantize-weights{method=gptq}", "calibrated-hessian"),
    ("calibrate,quantize-weights{method=gptq}", "calibrated-hessian"),
    ("assign-bits", "calibrated-hessian"),
    ("quantize{mode=static}", "calibrated"),
    ("quantize-acts{bits=8,static=true}", "calibrated"),
    ("migrate-steps", "calibrated"),
    ("calibrate,fold-norms,smooth", "calibrated"),
    ("calibrate,rotate,smooth", "calibrated"),
    ("calibrate{hessian=true},rotate,quantize-weights{method=gptq}", "calibrated-hessian"),
    ("dyadic", "quantized"),
])
def test_passes_that_need_statistics_say_so(pipeline, needs):
    from lowbit.errors import PipelineError

    with pytest.raises(PipelineError, match=f"requires \\['{needs}'\\]"):
        PassManager.from_pipeline(pipeline, CompileContext()).check_order()


@pytest.mark.parametrize("pipeline", ["quantize-weights{method=rtn}", "quantize{mode=dynamic}", "quantize-acts{bits=4}",
                                      "calibrate{hessian=true},quantize-weights{method=gptq}"])
def test_passes_that_do_not_need_statistics_run_without(pipeline):
    PassManager.from_pipeline(pipeline, CompileContext()).check_order()


def test_passes_whose_identity_is_exact_declare_float_equivalence():
    """fold-norms (γ/β into the linears), rotate (Q·Qᵀ = I), smooth and awq (diag(s)⁻¹·diag(s)) and canonicalize
    (the same graph in canonical form) state an exact float identity in their docstrings, so each declares
    ``float_equivalent`` and the verifier then re-checks ORT's outputs after it in every test pipeline; no
    quantizing pass may declare it."""
    from lowbit.passmanager.manager import get_pass

    exact = ["fold-norms", "rotate", "smooth", "awq", "canonicalize"]
    lossy = ["quantize", "quantize-weights", "quantize-acts", "quantize-kv", "migrate-steps", "quantize-embeddings"]
    assert [n for n in exact if not get_pass(n).float_equivalent] == []
    assert [n for n in lossy if get_pass(n).float_equivalent] == []
