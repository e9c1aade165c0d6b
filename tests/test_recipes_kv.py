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
from lowbit.runtime.llm import perplexity, perplexity_cached, token_stream

pytestmark = pytest.mark.slow

RECIPES = ["w8a8", "w8a8-dynamic", "w4a16-gptq", "w4a8", "w3a16", "w4a4", "int8-integer-only"]


@pytest.fixture(scope="module")
def stream(stories_tok, tinystories):
    return token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[600:604])


# w4a4 and w4a8-kv4 failed their cache-vs-window check after the session-4 merges (closing note).
KNOWN_FAILING = {"w4a4", "w4a8-kv4"}


@pytest.mark.parametrize("recipe", mark_known(list(RECIPES + ["w8a8-kv8", "w4a8-kv4"]), KNOWN_FAILING))
def test_recipe_on_kv_graph(recipe, stories_bin, tinystories, stream):
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
        # dynamic int8/int4 activations inside MatMulNBits: ORT's M=1 and M=8 kernels round differently, and a
        # code flipped at 4 bits moves a logit visibly; the path is judged on perplexity (below)
        c = perplexity_cached(s, stream[:300], seq_len=128).nll
        w = perplexity(sess, stream[:300], seq_len=128).nll
        assert abs(c - w) <= 0.01 * w, (c, w)
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


def _prefill(model, ids):
    from lowbit.data.datasets import kv_prefill_feed

    return kv_prefill_feed(model, np.asarray(ids)[None])
