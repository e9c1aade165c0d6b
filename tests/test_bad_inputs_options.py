"""Bad options (issue 17, "validated at the door"): every CLI option and pass option is range-checked —
NaN and ±inf included — before anything is loaded; the refusal is one ``error:`` line naming the option,
exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
from bad_input_cases import cli_refuses, npz_dir, plan_dict
from robust_models import tiny_llama, token_feeds

import lowbit
from lowbit.errors import InputError, LowbitError, PipelineError

# (argv after the command's positional arguments, text the error line must hold)
COMPILE_OPTIONS = {
    "samples-negative": (["--calibration-samples", "-1"], "--calibration-samples: must be >= 1, got -1"),
    "samples-zero": (["--calibration-samples", "0"], "--calibration-samples: must be >= 1"),
    "samples-text": (["--calibration-samples", "abc"], "expects a whole number, got 'abc'"),
    "samples-float": (["--calibration-samples", "1.5"], "expects a whole number, got '1.5'"),
    "seed-negative": (["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    "seed-huge": (["--seed", str(2 ** 40)], "--seed: must be in"),
    "encoding-unknown": (["--encoding", "klingon-8"], "unknown text encoding 'klingon-8'"),
    "backend-unknown": (["--backend", "cuda"], "--backend: invalid choice: 'cuda'"),
}

EVAL_OPTIONS = {
    "stories-abc": (["--stories", "abc"], "--stories: expects A:B"),
    "stories-reversed": (["--stories", "10:5"], "'10:5' selects no story"),
    "stories-empty-range": (["--stories", "5:5"], "'5:5' selects no story"),
    "stories-negative": (["--stories=-3:"], "story indices must be >= 0"),
    "stories-three-parts": (["--stories", "1:2:3"], "--stories: expects A:B with whole numbers"),
    "stories-float": (["--stories", "1.5:3"], "--stories: expects A:B with whole numbers"),
    "seq-len-zero": (["--seq-len", "0"], "--seq-len: must be in [2, 1048576], got 0"),
    "seq-len-negative": (["--seq-len", "-5"], "--seq-len: must be in [2, 1048576], got -5"),
    "seq-len-one": (["--seq-len", "1"], "--seq-len: must be in [2, 1048576], got 1"),
    "seq-len-text": (["--seq-len", "many"], "--seq-len: expects a whole number"),
    "encoding-unknown": (["--encoding", "nope"], "unknown text encoding 'nope'"),
}

AUDIT_OPTIONS = {
    "noise-negative": (["--noise-threshold", "-1"], "--noise-threshold: must be >= 1.0, got -1"),
    "noise-zero": (["--noise-threshold", "0"], "--noise-threshold: must be >= 1.0"),
    "noise-below-one": (["--noise-threshold", "0.5"], "--noise-threshold: must be >= 1.0"),
    "noise-nan": (["--noise-threshold", "nan"], "--noise-threshold: must be a finite number, got nan"),
    "noise-inf": (["--noise-threshold", "inf"], "--noise-threshold: must be a finite number, got inf"),
    "samples-zero": (["--samples", "0"], "--samples: must be >= 1"),
    "generate-negative": (["--generate", "-1"], "--generate: must be in [0, 4096]"),
}

# pass options in a pipeline string: NaN/inf and out-of-range values never reach a pass
PASS_OPTIONS = {
    "target-nan": ("calibrate{hessian=true},assign-bits{target=nan},quantize-weights,lower-nbits",
                   "assign-bits: option 'target' must be a finite number, got nan"),
    "target-inf": ("calibrate{hessian=true},assign-bits{target=inf},quantize-weights,lower-nbits",
                   "option 'target' must be a finite number, got inf"),
    "target-negative": ("calibrate{hessian=true},assign-bits{target=-3},quantize-weights,lower-nbits",
                        "target must be positive"),
    "alpha-nan": ("calibrate,smooth{alpha=nan},quantize,lower-ort", "option 'alpha' must be a finite number"),
    "alpha-neg-inf": ("calibrate,smooth{alpha=-inf},quantize,lower-ort", "option 'alpha' must be a finite number"),
    "damp-nan": ("calibrate{hessian=true},quantize-weights{damp=nan},lower-nbits", "option 'damp' must be a finite"),
    "percentile-nan": ("calibrate,quantize{percentile=nan},lower-ort", "option 'percentile' must be a finite"),
    "split-inf": ("calibrate{hessian=true},assign-bits{split=inf},quantize-weights,lower-nbits",
                  "option 'split' must be a finite"),
    "samples-negative": ("calibrate{hessian=true},assign-bits{samples=-1},quantize-weights,lower-nbits",
                         "samples must be >= 0"),
    "refine-huge": ("calibrate{hessian=true},assign-bits{refine=1000000},quantize-weights,lower-nbits",
                    "refine must be in [0, 100]"),
    "rotate-seed-negative": ("fold-norms,rotate{seed=-1},lower-ort", "seed must be in [0, 2^32)"),
    "bits-nan": ("calibrate{hessian=true},quantize-weights{bits=nan},lower-nbits", "option 'bits' expects int"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("opt") / "tiny.onnx")


@pytest.mark.parametrize("case", list(COMPILE_OPTIONS))
def test_compile_option_refused(case, tiny, tmp_path, capsys):
    argv, needle = COMPILE_OPTIONS[case]
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", tiny, "-o", out, *argv], capsys, needle, out=out)


@pytest.mark.parametrize("case", ["samples-negative", "samples-zero"])
def test_export_option_refused(case, tiny, tmp_path, capsys):
    argv, needle = COMPILE_OPTIONS[case]
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["export", tiny, "-o", out, "--calibration", tmp_path, *argv], capsys, needle, out=out)


@pytest.mark.parametrize("case", list(EVAL_OPTIONS))
def test_eval_option_refused(case, tiny, tmp_path, capsys):
    argv, needle = EVAL_OPTIONS[case]
    text = tmp_path / "t.txt"
    text.write_text("a story")
    cli_refuses(["eval", tiny, "--ppl", text, *argv], capsys, needle)


@pytest.mark.parametrize("case", list(AUDIT_OPTIONS))
def test_audit_option_refused(case, tiny, tmp_path, capsys):
    argv, needle = AUDIT_OPTIONS[case]
    cli_refuses(["audit", tiny, tiny, "--calibration", tmp_path, *argv], capsys, needle)


@pytest.mark.parametrize("case", list(PASS_OPTIONS))
def test_pass_option_refused_before_loading(case, tmp_path, capsys):
    """The model path does not even exist: the pipeline is checked first, so the option is what is named."""
    recipe, needle = PASS_OPTIONS[case]
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", tmp_path / "absent.onnx", "--recipe", recipe, "-o", out], capsys, needle, out=out)
    with pytest.raises(PipelineError, match="|".join(["option", "must", "expects"])):
        lowbit.compile(tmp_path / "absent.onnx", recipe, output=out, progress=False)


@pytest.mark.parametrize("kwargs, needle", [
    ({"calibration_samples": -1}, "calibration_samples must be a whole number >= 1, got -1"),
    ({"calibration_samples": 0}, "calibration_samples must be a whole number >= 1, got 0"),
    ({"calibration_samples": 2.5}, "calibration_samples must be a whole number >= 1, got 2.5"),
    ({"calibration_samples": True}, "calibration_samples must be a whole number >= 1, got True"),
    ({"seed": -4}, "seed must be a whole number in [0, 2^32)"),
    ({"encoding": "no-such-codec"}, "unknown text encoding"),
    ({"backend": "tpu"}, "unknown backend 'tpu'"),
], ids=["samples-neg", "samples-zero", "samples-float", "samples-bool", "seed-neg", "encoding", "backend"])
def test_api_arguments_refused(kwargs, needle, tiny, tmp_path):
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(LowbitError) as info:
        lowbit.compile(tiny, "w8a8", calibration=token_feeds(2), output=out, progress=False, **kwargs)
    assert needle in str(info.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_calibration_samples_minus_one_never_drops_a_sample(tiny, tmp_path):
    """The old behaviour: ``[:-1]`` silently dropped the last sample.  Now -1 is refused and N keeps N."""
    cal = npz_dir(tmp_path / "cal", token_feeds(3))
    with pytest.raises(InputError):
        lowbit.compile(tiny, "w8a8", calibration=str(cal), calibration_samples=-1, progress=False)
    res = lowbit.compile(tiny, "w8a8", calibration=str(cal), calibration_samples=3, progress=False)
    assert res.report["calibration_samples"] == 3


@pytest.mark.parametrize("kwargs, needle", [
    ({"stories": "10:5"}, "selects no story"),
    ({"stories": "x"}, "expects A:B"),
    ({"stories": slice(0, 4, 2)}, "a step is not supported"),
    ({"seq_len": 0}, "--seq-len must be a whole number >= 2, got 0"),
    ({"seq_len": -5}, "--seq-len must be a whole number >= 2, got -5"),
], ids=["reversed", "abc", "step", "seq0", "seq-5"])
def test_evaluate_api_refuses(kwargs, needle, tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a story")
    with pytest.raises(InputError) as info:
        lowbit.evaluate(tiny, ppl=text, **kwargs)
    assert needle in str(info.value)


def test_plan_option_values_are_schema_checked(tmp_path, capsys):
    plan = plan_dict()
    plan["target"] = "three"
    path = tmp_path / "p.json"
    import json

    path.write_text(json.dumps(plan))
    cli_refuses(["report", path], capsys, "target must be a finite number")


TUNE_OPTIONS = {
    "trials-zero": (["--trials", "0"], "--trials must be in [1, 1000000], got 0"),
    "trials-negative": (["--trials", "-5"], "--trials must be in [1, 1000000]"),
    "workers-zero": (["--max-workers", "0"], "--max-workers must be in [1, 1024]"),
    "shape-zero-dim": (["--shape", "tokens=0x4"], "needs a name and dimensions >= 1"),
    "shape-text": (["--shape", "tokens=ax4"], "argument --shape: invalid"),
}


@pytest.mark.parametrize("case", list(TUNE_OPTIONS))
def test_tune_option_refused(case, tiny, tmp_path, capsys):
    argv, needle = TUNE_OPTIONS[case]
    cli_refuses(["tune", tiny, "--out", tmp_path / "records", *argv], capsys, needle)
    assert not (tmp_path / "records").exists()
