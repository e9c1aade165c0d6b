"""Quality of the W8A8 recipes on the real models (small held-out slices; benchmarks run the full sets)."""

from __future__ import annotations

import numpy as np

import lowbit
from lowbit.data.datasets import EVAL_STORIES, read_stories, read_sts
from lowbit.runtime.encoder import sts_spearman
from lowbit.runtime.llm import perplexity, token_stream
from lowbit.ir.sessions import make_session
from lowbit.data.tokenizers import Llama2cTokenizer


def test_stories260k_w8a8_perplexity_within_2_percent(stories_bin, stories_tok, tinystories, stories_calibration):
    stream = token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[EVAL_STORIES][:60])
    fp32 = perplexity(make_session(lowbit.load_model(stories_bin)), stream)
    result = lowbit.compile(lowbit.load_model(stories_bin), "w8a8", calibration=stories_calibration, progress=False)
    w8a8 = perplexity(make_session(result.model), stream)
    assert fp32.tokens == w8a8.tokens > 20000
    assert w8a8.ppl < fp32.ppl * 1.02


def test_minilm_w8a8_sts_spearman_at_least_81(minilm_model, minilm_calibration, sts_test):
    a, b, scores = read_sts(sts_test)
    tok = minilm_model.metadata_props["lowbit.tokenizer"]
    result = lowbit.compile(minilm_model, "w8a8", calibration=minilm_calibration[:8], progress=False)
    rho, _ = sts_spearman(make_session(result.model), tok, a, b, scores)
    assert rho >= 81.0
    assert np.isfinite(rho)
