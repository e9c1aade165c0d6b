"""Unreadable and unwritable files (issue 17): permission denied on the model, tokenizer, calibration, plan
or output folder is one ``error:`` line naming the file, exit code 2, no traceback, nothing written.

Root reads everything, so under root the cases run in one child process without CAP_DAC_OVERRIDE /
CAP_DAC_READ_SEARCH (``setpriv --bounding-set``): file modes then apply to it as to any user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_cases import npz_dir, story_text, text_llama
from robust_models import tiny_llama, token_feeds

_RUNNER = """
import contextlib, io, json, sys
from lowbit.api.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code
    out.append({"rc": rc, "err": err.getvalue()})
print("RESULTS" + json.dumps(out))
"""


def _locked(path: Path, mode: int = 0) -> Path:
    path.chmod(mode)
    return path


def _cases(t: Path) -> dict[str, tuple[list[str], str, Path | None]]:
    model, tok = text_llama(t / "m")
    (t / "cal.txt").write_text(story_text(4))
    tiny = tiny_llama(t / "tiny.onnx")
    out = t / "out" / "m.onnx"
    (t / "ro").mkdir()
    plan = t / "plan.json"
    plan.write_text("{}")
    shutil.copy(tiny, t / "tiny_copy.onnx")
    return {
        "model": (["compile", str(_locked(t / "tiny_copy.onnx")), "-o", str(out)], "tiny_copy.onnx': permission denied",
                  out),
        "tokenizer": (["compile", str(model), "--calibration", str(t / "cal.txt"), "--tokenizer", str(_locked(tok)),
                       "-o", str(out)], "tok.bin': permission denied", out),
        "calibration-text": (["compile", str(model), "--tokenizer", str(t / "m" / "tok2.bin"), "--calibration",
                              str(_locked(t / "cal.txt")), "-o", str(out)], "cal.txt': permission denied", out),
        "calibration-npz": (["compile", str(tiny), "--calibration",
                             str(_locked(npz_dir(t / "npz", token_feeds(2)) / "000.npz").parent), "-o", str(out)],
                            "000.npz': permission denied", out),
        "plan": (["report", str(_locked(plan))], "plan.json': permission denied", None),
        "output-folder": (["compile", str(tiny), "--recipe", "w8a8-dynamic-nosmooth", "-o",
                           str(_locked(t / "ro", 0o555) / "m.onnx")], "permission denied", t / "ro" / "m.onnx"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    t = tmp_path_factory.mktemp("perm")
    shutil.copy(text_llama(t / "m")[1], t / "m" / "tok2.bin")
    cases = _cases(t)
    cmd = [sys.executable, "-c", _RUNNER, json.dumps([c[0] for c in cases.values()])]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: root reads every file whatever its mode")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if "RESULTS" not in proc.stdout:
        pytest.fail(proc.stderr[-2000:])
    got = json.loads(proc.stdout.split("RESULTS", 1)[1])
    yield {name: (res, case) for (name, case), res in zip(cases.items(), got)}
    for p in t.rglob("*"):
        with __import__("contextlib").suppress(OSError):
            p.chmod(0o755)


@pytest.mark.parametrize("case", ["model", "tokenizer", "calibration-text", "calibration-npz", "plan", "output-folder"])
def test_permission_denied(case, results):
    res, (args, needle, out) = results[case]
    lines = [ln for ln in res["err"].splitlines() if "error:" in ln]
    assert res["rc"] == 2, res
    assert "Traceback" not in res["err"] and len(lines) == 1, res["err"]
    assert lines[0].startswith(f"lowbit {args[0]}: error:") and needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and [p.name for p in out.parent.iterdir()] == [] if out.parent.exists() else True
