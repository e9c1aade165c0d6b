"""Every recipe on the KV-cache graph of stories260K: the interface survives, the graph scores the same
windows as the recipe's cache-less graph, and cached decoding reproduces the graph's own full logits."""

from __future__ import annotations

import numpy as np
import pytest
from known_failures import mark_known

import lowbit
from lowbit.data.datasets import read_stories
from lowbit.data.tokenizers import Llama2cTokenizer
from lowbit.frontends.decoder import kv_input_names, kv_output_names
from lowbit.frontends.llama2c import llama2c_spec, read_llama2c
from lowbit.ir.sessions import make_session
from lowbit.runtime import KVSession
from lowbit.runtime.llm import log_softmax, perplexity, token_stream

pytestmark = pytest.mark.slow

RECIPES = ["w8a8", "w8a8-dynamic", "w4a16-gptq", "w4a8", "w3a16", "w4a4", "int8-integer-only"]


@pytest.fixture(scope="module")
def stream(stories_tok, tinystories):
    return token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[600:604])


KNOWN_FAILING: set = set()


@pytest.mark.parametrize("recipe", mark_known(list(RECIPES + ["w8a8-kv8", "w4a8-kv4"]), KNOWN_FAILING))
def test_recipe_on_kv_graph(recipe, stories_bin, tinystories, stream, stories_tok):
    cfg, _ = read_llama2c(stories_bin)
    spec = llama2c_spec(cfg)
    kv = lowbit.compile(stories_bin, recipe, calibration=tinystories, calibration_samples=16, kv_cache=True,
                        progress=False).model
    assert [v.name for v in kv.graph.inputs][: len(kv_input_names(spec))] == kv_input_names(spec)
    assert [v.name for v in kv.graph.outputs][: len(kv_output_names(spec))] == kv_output_names(spec)
    sess = make_session(kv)
    ids = stream[:40]
    full = sess.run(["logits"], _prefill(kv, ids))[0][0]
    s = KVSession(sess)
    got = np.concatenate([s.step(ids[:8], last_only=False)[0]] +
                         [s.step(ids[t : t + 1], last_only=False)[0] for t in range(8, len(ids))])
    err = np.max(np.abs(got - full)) / np.max(np.abs(full))
    if recipe in ("w4a4", "w4a8", "w4a8-kv4"):
        # A one-token step sums attention in another order than a window (last-bit differences); int4
        # activations re-quantized to int8 inside MatMulNBits sit on exact .5 ties, so such a bit flips a
        # code and the logits differ visibly.  Flips are unbiased: the cached path's per-token NLL must not
        # differ from the window's by more than their paired noise (3 standard errors over 1536 tokens).
        long = token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[600:616])[:1537]
        d = _token_nll(s, kv, sess, long, cached=True) - _token_nll(s, kv, sess, long, cached=False)
        assert abs(d.mean()) <= 3 * d.std(ddof=1) / np.sqrt(d.size), (d.mean(), d.std(ddof=1), d.size)
    else:
        assert err <= 1e-5, err
    if "kv" not in recipe:  # the same passes on the cache-less graph give the same model
        plain = lowbit.compile(stories_bin, recipe, calibration=tinystories, calibration_samples=16,
                               progress=False).model
        a = perplexity(make_session(plain), stream, seq_len=128).nll
        b = perplexity(sess, stream, seq_len=128).nll
        assert abs(a - b) <= 1e-4 * a, (a, b)
    else:
        assert kv.graph.inputs[3].dtype.name == "UINT8"


def _token_nll(s, model, sess, stream, cached: bool, window: int = 128) -> np.ndarray:
    out = []
    for a in range(0, len(stream) - 1, window):
        w = stream[a : a + window + 1]
        if cached:
            s.reset()
            logits = np.concatenate([s.step(w[t : t + 1], last_only=False)[0] for t in range(len(w) - 1)])
        else:
            logits = sess.run(["logits"], _prefill(model, w[:-1]))[0][0]
        out.append(-np.take_along_axis(log_softmax(logits), w[1:, None], -1)[:, 0])
    return np.concatenate(out)


def _prefill(model, ids):
    from lowbit.data.datasets import kv_prefill_feed

    return kv_prefill_feed(model, np.asarray(ids)[None])
