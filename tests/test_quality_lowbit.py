"""Low-bit recipes on held-out text (TinyStories stories 600–784, never used to choose a default):
the issue's targets, checked end to end on the real models.  Slow: benchmarks/quality.py prints
the full table."""

from __future__ import annotations

import pytest

import lowbit
from lowbit.data.datasets import REPORT_STORIES, read_stories, read_sts
from lowbit.data.tokenizers import Llama2cTokenizer
from lowbit.ir.sessions import make_session
from lowbit.runtime.llm import perplexity, token_stream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report_stream(stories_tok, tinystories):
    return token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[REPORT_STORIES])


@pytest.fixture(scope="module")
def calibration_100(stories_tok, tinystories):
    from lowbit.data.datasets import CALIB_STORIES, causal_lm_feeds

    return causal_lm_feeds(Llama2cTokenizer(stories_tok), read_stories(tinystories)[CALIB_STORIES], 256)


@pytest.mark.parametrize("recipe, max_delta, max_bytes", [("w4a16-gptq", 0.10, 360_000), ("w8a8", 0.005, None)])
def test_stories260k_recipe_on_held_out_text(recipe, max_delta, max_bytes, stories_bin, report_stream,
                                             calibration_100, tmp_path):
    fp32 = perplexity(make_session(lowbit.load_model(stories_bin)), report_stream).ppl
    out = tmp_path / f"{recipe}.onnx"
    lowbit.compile(lowbit.load_model(stories_bin), recipe, calibration=calibration_100, calibration_samples=None,
                   output=out, progress=False)
    ppl = perplexity(make_session(str(out)), report_stream).ppl
    assert ppl <= fp32 * (1 + max_delta)
    if max_bytes:
        assert sum(p.stat().st_size for p in tmp_path.glob(f"{recipe}.onnx*")) <= max_bytes


def test_minilm_w4a16_gptq_within_0p2_sts_points(minilm_model, minilm_calibration, sts_test):
    from lowbit.runtime.encoder import sts_spearman

    a, b, scores = read_sts(sts_test)
    tok = minilm_model.metadata_props["lowbit.tokenizer"]
    result = lowbit.compile(minilm_model, "w4a16-gptq", calibration=minilm_calibration, progress=False)
    rho, _ = sts_spearman(make_session(result.model), tok, a, b, scores)
    assert rho >= 82.03 - 0.2


def test_stories260k_three_and_two_bit_on_held_out_text(stories_bin, report_stream, calibration_100, tmp_path):
    """The issue's 3- and 2-bit targets (w3a16 ≤ +35 %, w2a16 ≤ +150 %); the 2-bit file is smaller than the 3-bit
    one; mixed-w3a16 is not larger than w3a16 and has lower perplexity."""
    fp32 = perplexity(make_session(lowbit.load_model(stories_bin)), report_stream).ppl
    got = {}
    for recipe in ("w3a16", "w2a16", "mixed-w3a16"):
        out = tmp_path / f"{recipe}.onnx"
        lowbit.compile(lowbit.load_model(stories_bin), recipe, calibration=calibration_100, calibration_samples=None,
                       output=out, progress=False)
        got[recipe] = (perplexity(make_session(str(out)), report_stream).ppl,
                       sum(p.stat().st_size for p in tmp_path.glob(f"{recipe}.onnx*")))
    assert got["w3a16"][0] <= fp32 * 1.35 and got["w2a16"][0] <= fp32 * 2.5
    assert got["w2a16"][1] < got["w3a16"][1]
    assert got["mixed-w3a16"][1] <= got["w3a16"][1] and got["mixed-w3a16"][0] < got["w3a16"][0]
