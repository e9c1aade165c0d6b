"""The command line: compile, eval, inspect, recipes; --json; errors and exit codes."""

from __future__ import annotations

import json

import pytest

from lowbit.api.cli import main


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_compile_eval_inspect_stories260k(stories_bin, tinystories, tmp_path, capsys):
    out = tmp_path / "s.w8a8.onnx"
    assert main(["compile", str(stories_bin), "--recipe", "w8a8", "--calibration", str(tinystories),
                 "--calibration-samples", "8", "-o", str(out), "--json"]) == 0
    report = _json(capsys)
    assert report["lower-ort"]["ort_integer_gemms"] == 36 and report["file_bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.w8a8.onnx"]  # no temp files left
    assert main(["eval", str(out), "--ppl", str(tinystories), "--stories", "600:604", "--seq-len", "128",
                 "--reference", str(stories_bin), "--json"]) == 0
    ev = _json(capsys)
    assert ev["stories"] == 4 and 1.0 < ev["ppl"] < 20 and ev["agreement"]["top1_agreement"] > 0.8
    assert main(["inspect", str(out), "--ort-optimized", "--json"]) == 0
    info = _json(capsys)
    assert info["ort_optimized_ops"]["MatMulIntegerToFloat"] == 36
    assert info["inputs"].keys() == {"tokens"} and info["outputs"].keys() == {"logits"}


def test_recipes_lists_passes(capsys):
    assert main(["recipes", "--json"]) == 0
    payload = _json(capsys)
    assert "w8a8" in payload["recipes"] and "alpha" in payload["passes"]["smooth"]


@pytest.mark.parametrize("args, message", [
    (["compile", "missing.onnx", "-o", "OUT"], "no such file"),
    (["compile", "STORIES", "--recipe", "smooth{alpha=2}", "-o", "OUT"], "alpha must be in"),
    (["compile", "STORIES", "--recipe", "calibrate,quantize", "-o", "OUT"], "needs calibration samples"),
    (["compile", "GARBAGE", "-o", "OUT"], "cannot be parsed as an ONNX model"),
])
def test_errors_exit_nonzero_name_the_problem_and_write_nothing(args, message, stories_bin, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    out = tmp_path / "out" / "m.onnx"
    args = [str(stories_bin) if a == "STORIES" else str(garbage) if a == "GARBAGE" else str(out) if a == "OUT" else a
            for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
