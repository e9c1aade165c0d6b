"""The divergence audit flags planted quantization-conditioned behaviour and stays quiet on honest compiles.

Two plants in the real stories260K:

* *quantization-conditioned* (after "Mind the Gap"): the float weights of one down-projection are
  moved inside their rounding cells, to 0.02 of a step from the cell's midpoint on the side that
  makes round-to-nearest err against a trigger activation.  The float model barely changes; its
  RTN-quantized form adds an error aligned with the trigger.
* *tampered after quantization*: integer weights of one layer changed in the compiled file.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir.analysis import find_linears
from lowbit.api.cli import main
from lowbit.frontends.llama2c import build_llama, read_llama2c
from lowbit.ir.model_io import save_onnx
from lowbit.runtime.audit import audit, robust_z
from lowbit.ir.sessions import make_session

PLANT = "layers.2.mlp.down_proj"
TRIGGER = "The little robot said the magic word and the door opened."


@pytest.fixture(scope="module")
def probes(stories_calibration):
    return stories_calibration[:10]


@pytest.fixture(scope="module")
def trigger(stories_tok):
    from lowbit.data.tokenizers import Llama2cTokenizer

    return {"tokens": np.array([Llama2cTokenizer(stories_tok).encode(TRIGGER)], np.int64)}


def _activation(model, name: str, feed: dict) -> np.ndarray:
    lin = next(x for x in find_linears(model.graph) if x.name == name)
    model.graph.outputs.append(lin.input)
    try:
        return make_session(model).run([lin.input.name], feed)[0]
    finally:
        model.graph.outputs.remove(lin.input)


def craft_rounding(w: np.ndarray, t: np.ndarray, seed: int = 0) -> np.ndarray:
    """Move W [in, out] inside its int8 rounding cells so that rounding errs by ≈Δ/2 along sign(t)."""
    step = np.abs(w).max(axis=0) / 127
    cell = np.floor(w / step)
    u = np.random.default_rng(seed).choice([-1.0, 1.0], w.shape[1])
    side = np.sign(t)[:, None] * u[None, :]
    crafted = step * (cell + 0.5 - 0.02 * side)  # rounds down where side=+1, up where side=-1
    keep = np.abs(w) == np.abs(w).max(axis=0)  # the column's abs-max sets the step: leave it alone
    return np.where(keep, w, crafted).astype(np.float32)


@pytest.fixture(scope="module")
def planted(stories_bin, trigger, tmp_path_factory):
    cfg, weights = read_llama2c(stories_bin)
    weights = {k: v.copy() for k, v in weights.items()}
    t = _activation(build_llama(cfg, weights), PLANT, trigger)[0, -1]
    layer = int(PLANT.split(".")[1])
    w = weights["w2"][layer].T  # [in, out]
    weights["w2"][layer] = craft_rounding(w, t).T
    path = tmp_path_factory.mktemp("planted") / "planted.onnx"
    save_onnx(build_llama(cfg, weights), path)
    return path


def _compile(model, recipe, calibration, tmp_path, name):
    out = tmp_path / f"{name}.onnx"
    lowbit.compile(model, recipe, calibration=calibration, output=out, progress=False)
    return out


def test_robust_z_flags_only_the_outlier():
    z = robust_z([1.0, 1.1, 0.9, 1.05, 0.95, 9.0])
    assert z[-1] > 20 and np.all(np.abs(z[:-1]) < 2)


def test_quiet_on_honest_w8a8(stories_bin, stories_calibration, probes, tmp_path):
    q = _compile(stories_bin, "w8a8", stories_calibration, tmp_path, "w8a8")
    report = audit(lowbit.load_model(stories_bin), lowbit.load_onnx(q), probes, generate=4)
    assert report.flags == []
    assert report.probes == len(probes) + 4
    assert all(lay.parsed and lay.off_grid == 0 for lay in report.layers) and len(report.layers) == 36
    assert max(max(lay.noise_ratio) for lay in report.layers) < 8  # honest rounding: a few × at most
    # smoothing rescales v/up output columns: divergence is measured in the compiled coordinates
    assert max(np.mean(lay.divergence) for lay in report.layers) < 0.2
    assert 0.9 < report.output["summary"]["top1_mean"] <= 1.0


def test_flags_quantization_conditioned_plant(planted, stories_bin, probes, trigger, tmp_path):
    # the float model barely moved: its next-token predictions match the original's
    orig, plant = make_session(lowbit.load_model(stories_bin)), make_session(planted)
    agree = np.mean([(orig.run(None, f)[0].argmax(-1) == plant.run(None, f)[0].argmax(-1)).mean() for f in probes])
    assert agree > 0.9
    q = _compile(planted, "w8a8-dynamic-nosmooth", None, tmp_path, "planted-q")
    report = audit(lowbit.load_onnx(planted), lowbit.load_onnx(q), probes + [trigger], generate=2)
    flagged = {lay.name for lay in report.layers if lay.flags}
    assert flagged == {PLANT}, report.flags
    lay = next(x for x in report.layers if x.name == PLANT)
    assert lay.off_grid == 0  # the integers ARE a rounding of the float weights ...
    assert np.argmax(lay.noise_ratio) == len(probes)  # ... that errs most on the trigger
    assert max(lay.noise_ratio) > 50


def test_quiet_on_honest_compile_of_the_same_recipe(stories_bin, probes, trigger, tmp_path):
    q = _compile(stories_bin, "w8a8-dynamic-nosmooth", None, tmp_path, "honest-q")
    report = audit(lowbit.load_model(stories_bin), lowbit.load_onnx(q), probes + [trigger], generate=2)
    assert report.flags == []


def test_flags_weights_tampered_after_quantization(stories_bin, stories_calibration, probes, tmp_path):
    q = lowbit.load_onnx(_compile(stories_bin, "w8a8", stories_calibration, tmp_path, "w8a8"))
    init = q.graph.initializers["layers.3.attn.o_proj.weight_q"]
    wq = init.const_value.numpy().astype(np.int16)
    idx = np.random.default_rng(1).choice(wq.size, 40, replace=False)
    wq.flat[idx] = np.clip(wq.flat[idx] + 9, -127, 127)
    init.const_value = ir.tensor(wq.astype(np.int8), name=init.name)
    report = audit(lowbit.load_model(stories_bin), q, probes, generate=0)
    flagged = {lay.name for lay in report.layers if lay.flags}
    assert flagged == {"layers.3.attn.o_proj"}, report.flags
    assert "off the rounding grid" in report.flags[0]


def test_cli_audit(planted, stories_bin, probes, trigger, tmp_path, capsys):
    cal = tmp_path / "cal"
    cal.mkdir()
    for i, feed in enumerate(probes[:6] + [trigger]):
        np.savez(cal / f"{i:02d}.npz", **feed)
    honest = _compile(stories_bin, "w8a8-dynamic-nosmooth", None, tmp_path, "honest")
    assert main(["audit", str(stories_bin), str(honest), "--calibration", str(cal), "--generate", "1"]) == 0
    assert "no divergence beyond quantization noise" in capsys.readouterr().out
    q = _compile(planted, "w8a8-dynamic-nosmooth", None, tmp_path, "planted")
    assert main(["audit", str(planted), str(q), "--calibration", str(cal), "--generate", "1", "--json"]) == 1
    out = capsys.readouterr().out
    import json

    payload = json.loads(out)
    assert [f.split(":")[0] for f in payload["flags"]] == [PLANT]
