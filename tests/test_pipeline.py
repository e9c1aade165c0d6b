"""Pipeline strings, the pass registry, options and the pass manager's contracts."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.errors import PipelineError
from lowbit.passmanager.manager import CompileContext, PassManager, get_pass
from lowbit.passmanager.pipeline import parse_pipeline
from lowbit.passmanager.recipes import RECIPES, resolve_recipe


@pytest.mark.parametrize("text", [
    "smooth",
    "calibrate,smooth{alpha=0.5},quantize{weights=8,acts=8}",
    "quantize{mode=dynamic,exclude=lm_head|embed},lower-ort",
    "smooth{alpha=0.35,search=true}",
    *RECIPES.values(),
])
def test_pipeline_prints_back_identically(text):
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline(str(parse_pipeline(text)))) == text


@pytest.mark.parametrize("text, message", [
    ("", "empty pipeline"),
    ("smooth{alpha=0.5", "unclosed"),
    ("smooth{alpha}", "key=value"),
    ("smooth{alpha=0.5,alpha=0.6}", "given twice"),
    ("Smooth", "expected a pass name"),
    ("smooth;quantize", "expected ','"),
])
def test_malformed_pipelines_are_refused_with_a_column(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(PipelineError, match="did you mean 'smooth'"):
        get_pass("smoth")


@pytest.mark.parametrize("text, message", [
    ("smooth{alpha=1.5}", "alpha must be in"),
    ("smooth{beta=1}", "has no option 'beta'"),
    ("smooth{alpha=high}", "expects float"),
    ("quantize{mode=weird}", "must be one of"),
    ("quantize{acts=4}", "acts must be 8 or 16"),
])
def test_bad_options_are_refused(text, message):
    with pytest.raises(PipelineError, match=message):
        PassManager.from_pipeline(text, CompileContext())


def test_options_are_frozen_and_typed():
    pm = PassManager.from_pipeline("smooth{alpha=0.4},quantize{acts=16}", CompileContext())
    smooth, quant = pm.passes
    assert smooth.options.alpha == 0.4 and isinstance(smooth.options.alpha, float)
    assert quant.options.acts == 16
    with pytest.raises(Exception):
        smooth.options.alpha = 0.9
    assert str(pm.pipeline) == "smooth{alpha=0.4},quantize{acts=16}"


def test_requirements_are_checked_before_anything_runs(stories_model):
    pm = PassManager.from_pipeline("smooth,quantize", CompileContext())
    with pytest.raises(PipelineError, match="(?s)requires \\['calibrated'\\].*put 'calibrate' before 'smooth'"):
        pm.run(stories_model)


def test_every_recipe_resolves_to_registered_passes():
    for name, pipe in RECIPES.items():
        assert resolve_recipe(name) == pipe
        for item in parse_pipeline(pipe):
            get_pass(item.name)
    with pytest.raises(PipelineError, match="unknown recipe"):
        resolve_recipe("w9a9")


def test_pass_failure_writes_a_reproducer(stories_model, tmp_path):
    # rotation of norms whose scale is not 1 fails inside the pass (ordering errors are caught before any pass)
    with pytest.raises(lowbit.LowbitError, match="(?s)pass 'rotate'.*fold-norms"):
        lowbit.compile(stories_model, "rotate,quantize-weights", reproducer=tmp_path / "repro", progress=False)
    assert (tmp_path / "repro" / "pipeline.txt").read_text().strip() == "rotate,quantize-weights"
    reloaded = lowbit.load_onnx(tmp_path / "repro" / "input.onnx")
    assert len(list(reloaded.graph)) == len(list(stories_model.graph))


def test_timing_and_dump_instruments(stories_model, stories_calibration, tmp_path):
    result = lowbit.compile(stories_model, "w8a8", calibration=stories_calibration, dump_ir=tmp_path / "ir",
                            progress=False)
    assert [r[0] for r in result.timing.rows] == [str(i) for i in parse_pipeline(RECIPES["w8a8"])]
    dumped = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumped == ["02-smooth.txt", "03-quantize.txt"]  # calibrate and lower-ort change nothing
    assert "QuantizeLinear" in (tmp_path / "ir" / "03-quantize.txt").read_text()


def test_a_recipe_name_inside_a_pipeline_stands_for_its_passes():
    """'RECIPE,pass{…}' appends to a recipe (e.g. a TVM lowering with static shapes); a recipe name with
    options, or a name that is a pass, is not expanded."""
    got = resolve_recipe("int8-integer-only,lower-tvm{shapes=tokens:1x64}")
    assert got == str(parse_pipeline(RECIPES["int8-integer-only"] + ",lower-tvm{shapes=tokens:1x64}"))
    assert resolve_recipe("calibrate,w8a8").startswith("calibrate," + RECIPES["w8a8"].split(",")[0])
    with pytest.raises(PipelineError, match="unknown pass 'w8a8'"):
        PassManager.from_pipeline(resolve_recipe("w8a8{alpha=0.5},lower-ort"), CompileContext())
