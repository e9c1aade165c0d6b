"""``lowbit report PLAN.json``: the table names every layer with its bits and bytes; the plot is written."""

from __future__ import annotations

import json

import numpy as np

from lowbit.api.cli import main
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.mixed.bitplan import Plan
from lowbit.passmanager.manager import CompileContext, PassManager

CFG = LlamaConfig(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def make_plan(path):
    rng = np.random.default_rng(0)
    fs = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)} for _ in range(3)]
    ctx = CompileContext(calibration=fs, show_progress=False)
    PassManager.from_pipeline(f"calibrate{{hessian=true}},assign-bits{{target=3.5,split=0.25,save={path}}}",
                              ctx).run(build_llama(CFG, random_llama_weights(CFG)))
    return Plan.from_dict(ctx.report["assign-bits"]["plan"])


def test_report_table_json_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    path = tmp_path / "plan.json"
    plan = make_plan(path)
    assert main(["report", str(path), "--json", "--plot", str(tmp_path / "plan.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [lay["name"] for lay in out["layers"]] == [lp.name for lp in plan.layers]
    assert out["linear_bytes"] == plan.linear_bytes == sum(lay["bytes"] for lay in out["layers"])
    plot = tmp_path / out["plot"].split("/")[-1]
    assert plot.is_file() and plot.stat().st_size > 1000
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    for lp in plan.layers:
        assert lp.name in text and f"{lp.bytes + (lp.split['bytes'] if lp.split else 0):,}" in text


def test_report_refuses_a_file_that_is_not_a_plan(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{\"layers\": 3}")
    assert main(["report", str(bad)]) == 2
    assert "not a readable lowbit plan" in capsys.readouterr().err


def test_report_says_how_refinement_moved_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rng = np.random.default_rng(0)
    fs = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)} for _ in range(3)]
    ctx = CompileContext(calibration=fs, show_progress=False)
    path = tmp_path / "plan.json"
    PassManager.from_pipeline(f"calibrate{{hessian=true}},assign-bits{{target=3.5,estimator=measured,bits=2:3:4,"
                              f"refine=1,cache={tmp_path},save={path}}}", ctx).run(build_llama(CFG, random_llama_weights(CFG)))
    ref = Plan.load(path).extra["refine"]
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"refined from '{ref['start']}'" in text and f"{ref['loss']:.5g}" in text
    assert main(["report", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["refine"]["loss"] == ref["loss"]
