"""int8-integer-only on SmolLM2-135M's real weights (its GGUF cut after 2 decoder layers, the tied head
kept): reference == ORT == TVM (x86), bit for bit, on 100 real inputs.  (aarch64 under qemu: not yet —
100 inputs through the 49152-entry head emulated take longer than a CI step should; MiniLM and
stories260K cover the aarch64 build of the same integer ops.)

The whole model's compile takes most of an hour on 2 shared cores; the cut keeps SmolLM2's shapes,
weights, tokenizer, GQA attention, massive first-layer activations and 49152-entry head.  Inputs: 100
windows of 32 tokens cut from the reporting stories' stream; calibration: stories 0–15.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, read_stories
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.passmanager.recipes import RECIPES

INTEGER = RECIPES["int8-integer-only"].replace(",lower-lowbit,lower-ort", "")
LAYERS, INPUTS, TOKENS = 2, 100, 32


def _need(path):
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data missing: {path}")
        pytest.skip(f"shared data missing: {path} (set LOWBIT_DATA)")
    return path


@pytest.fixture(scope="module")
def smollm2():
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from lowbit.frontends.text_tokenizers import load_tokenizer
    from lowbit.runtime.llm import token_stream

    d = data_dir()
    gguf = _need(d / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = lowbit.load_model(gguf)
    norms = [n for n in model.graph if n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization")]
    norms[-1].replace_input_with(0, norms[2 * LAYERS].inputs[0])  # the final norm reads layer 2's stream
    RemoveUnusedNodesPass()(model)
    tok = load_tokenizer(gguf)
    text = read_stories(_need(d / "tinystories" / "tinystories_hf_validation_head.eot.txt"))
    name = model.graph.inputs[0].name
    calib = causal_lm_feeds(tok, text[CALIB_STORIES][:16], 256, name)
    stream = token_stream(tok, text[EVAL_STORIES])
    starts = np.random.default_rng(0).choice(len(stream) - TOKENS, INPUTS, replace=False)
    probes = [{name: stream[None, s:s + TOKENS].astype(np.int64)} for s in starts]
    ctx = CompileContext(calibration=calib, show_progress=False)
    model = PassManager.from_pipeline(INTEGER, ctx).run(model)
    return model, ctx.report, probes


@pytest.mark.slow  # the cut SmolLM2 compiled integer-only, then 100 inputs through the reference and ORT
def test_smollm2_reference_matches_ort_on_100_inputs(smollm2):
    from lowbit.ir.integer_check import check_integer_regions
    from lowbit.runtime.reference import compare_graph_with_ort

    model, report, probes = smollm2
    rep = check_integer_regions(model)
    assert rep.integer_gemms == 7 * LAYERS + 1 and not rep.float_gemms  # q k v o gate up down per layer + head
    cal = report["calibration"]  # stream windows of 256 tokens (the last shorter), not the 16 stories
    stats = next(p["stats"] for p in report["passes"] if p["pass"].startswith("calibrate"))
    assert cal["sequences"] == -(-cal["tokens"] // 256) == stats["stream_windows"]
    compared, mismatches = compare_graph_with_ort(model, probes)
    assert compared > INPUTS * (7 * LAYERS + 1) and mismatches == []


@pytest.mark.slow
def test_smollm2_tvm_matches_reference_on_100_inputs(smollm2, tmp_path):
    pytest.importorskip("tvm")
    from lowbit.runtime.reference_tvm import compare_graph_with_tvm

    model, _, probes = smollm2
    compared, mismatches = compare_graph_with_tvm(model, probes, out_dir=tmp_path)
    assert compared == INPUTS * sum(n.domain == "lowbit" for n in model.graph) and mismatches == []
