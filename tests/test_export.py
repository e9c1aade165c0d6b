"""``lowbit export``: integer-only graph + manifest on stories260K (16 calibration stories)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lowbit.api.cli import main
from lowbit.data.datasets import data_dir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = data_dir()
    model = d / "stories260K" / "stories260K.bin"
    text = d / "tinystories" / "tinystories_hf_validation_head.eot.txt"
    if not model.exists() or not text.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("shared data missing")
        pytest.skip("shared data missing (set LOWBIT_DATA)")
    out = tmp_path_factory.mktemp("export") / "s260k.onnx"
    rc = main(["export", str(model), "--tokenizer", str(d / "stories260K" / "tok512.bin"), "--calibration", str(text),
               "--calibration-samples", "16", "--output", str(out), "--json"])
    assert rc == 0
    return out, json.loads(out.with_suffix(".manifest.json").read_text())


def test_manifest_lists_what_a_device_needs(exported):
    out, m = exported
    assert m["format"] == "lowbit-integer-manifest" and m["version"] == 1 and m["model"] == out.name
    # 35 linears' requantizers (lm_head leaves as int32), 5 SwiGLU products, 10 residual rescales
    assert m["opsets"]["lowbit"] == 1 and m["ops"]["MatMulInteger"] == 36 and m["ops"]["lowbit.Requantize"] == 50
    assert m["ops"]["lowbit.IntNorm"] == 11 and m["ops"]["lowbit.Lookup"] == 5  # RMSNorms; silu tables
    assert len(m["gemms"]) == 36 and len(m["requantize"]) == 50
    entries = [q for q in m["quantizers"] if not q["unit_step"]]
    assert len(m["quantizers"]) == 6 and len(entries) == 1 and entries[0]["dtype"] == "int16"  # the residual entry
    for r in m["requantize"]:
        b, c = np.array(r["scales"]).T
        assert np.all((b >= 1) & (b < 2 ** 30)) and np.all((c >= 1) & (c <= 62)) and r["out_dtype"] in ("uint8",
                                                                                                           "int16")
    # residual stream: 10 adds × 2 operands; integer-exits: Q, K, V × 5 RoPE attentions; 5 up projections
    assert sum(r["out_dtype"] == "int16" for r in m["requantize"]) == 20 + 15 + 5
    assert max(g["accumulator_bound"] for g in m["gemms"]) < 2 ** 31
    assert "RMSNormalization" not in m["stays_float"] and "Softmax" in m["stays_float"]  # RoPE attention stays float


def test_device_graph_runs_on_the_reference(exported):
    """The exported graph keeps lowbit.Requantize; every integer region runs on the reference."""
    import lowbit
    from lowbit.ir.integer_check import check_integer_regions
    from lowbit.runtime.reference import ReferenceInterpreter

    out, m = exported
    model = lowbit.load_onnx(out)
    rep = check_integer_regions(model)
    assert rep.integer_gemms == 36 and not rep.float_rescales
    region = next(r for r in rep.regions if r.ops["lowbit.Requantize"])
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.integers(0, 256, (1, 7, v.shape[-1] if v.shape else 64)).astype(np.uint8)
             for n in region.nodes for v in n.inputs if v is not None and v.const_value is None
             and v.producer() not in region.nodes}
    env = ReferenceInterpreter(model).run(region.nodes, feeds)
    outs = [o for n in region.nodes if n.domain == "lowbit" for o in n.outputs]
    assert len(outs) > 50 and all(env[o.name].dtype == o.dtype.numpy() for o in outs)  # uint8 codes, int16 residual
    assert {env[o.name].dtype for o in outs} == {np.dtype(np.uint8), np.dtype(np.int16)}
