"""Generation through the KV cache: the session, sampling, streaming, the CLI, cache-path perplexity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.frontends.llama2c import build_llama, read_llama2c
from lowbit.ir.sessions import make_session
from lowbit.runtime import KVSession, generate
from lowbit.runtime.generate import sample_next
from lowbit.runtime.llm import perplexity, perplexity_cached, token_stream


@pytest.fixture(scope="module")
def stories(stories_bin):
    cfg, w = read_llama2c(stories_bin)
    return cfg, build_llama(cfg, w), build_llama(cfg, w, kv_cache=True)


def test_kv_session_decode_reproduces_full_logits(stories):
    cfg, full_model, kv_model = stories
    ids = np.array([1, 403, 407, 261, 378, 439, 270, 303, 414, 362, 310, 285, 408, 282, 419, 271, 344])
    full = make_session(full_model).run(None, {"tokens": ids[None]})[0][0]
    s = KVSession(kv_model)
    got = [s.step(ids[:5], last_only=False)[0]]
    got += [s.step(ids[t : t + 1], last_only=False)[0] for t in range(5, len(ids))]
    got = np.concatenate(got)
    assert s.length == len(ids)
    assert np.max(np.abs(got - full)) <= 1e-5 * np.max(np.abs(full))
    # the cache holds float32 K and V for every layer and token
    assert s.cache_bytes() == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * len(ids)
    s.reset()
    assert s.length == 0 and np.allclose(s.step(ids[:1])[0], full[0], rtol=0, atol=1e-5 * np.abs(full).max())


def test_greedy_from_bos_tells_the_lily_story(stories, stories_tok):
    _, _, kv_model = stories
    gen = generate(kv_model, "", tokenizer=stories_tok, max_new_tokens=20)
    pieces = [t.text for t in gen]
    text = "".join(pieces)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text
    assert text == gen.text and len([t for t in pieces if t]) > 5  # streamed piece by piece
    st = gen.stats
    assert st.new_tokens == 20 and st.prompt_tokens == 1 and len(st.decode_ms) == 19 and st.prefill_ms > 0


def test_prompt_continuation_and_eos_stop(stories, stories_tok):
    _, _, kv_model = stories
    gen = generate(kv_model, "Once upon a time", tokenizer=stories_tok, max_new_tokens=400)
    text = "".join(t.text for t in gen)
    assert text.startswith(",") or text.startswith(" "), text  # continues the prompt, no re-spacing
    assert gen.stats.stopped_by in ("eos", "max_new_tokens")
    if gen.stats.stopped_by == "eos":
        assert gen.stats.new_tokens < 400


def _softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def test_sampling_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    rng = np.random.default_rng(0)
    assert sample_next(logits, rng) == 0  # greedy
    draws = [sample_next(logits, rng, temperature=1.0, top_k=2) for _ in range(400)]
    assert set(draws) == {0, 1}
    freq = np.mean(np.array(draws) == 0)
    assert abs(freq - 0.5 / 0.7) < 0.07
    # nucleus: the smallest prefix reaching 0.8 is {0, 1, 2} (0.85)
    draws = [sample_next(logits, rng, temperature=1.0, top_p=0.8) for _ in range(400)]
    assert set(draws) == {0, 1, 2}
    # the same seed gives the same sequence
    a = [sample_next(logits, np.random.default_rng(7), temperature=0.9) for _ in range(5)]
    b = [sample_next(logits, np.random.default_rng(7), temperature=0.9) for _ in range(5)]
    assert a == b


def test_cache_path_perplexity_equals_window_perplexity(stories, stories_tok, tinystories):
    from lowbit.data.datasets import read_stories
    from lowbit.data.tokenizers import Llama2cTokenizer

    _, full_model, kv_model = stories
    stream = token_stream(Llama2cTokenizer(stories_tok), read_stories(tinystories)[600:602])
    window = perplexity(make_session(full_model), stream, seq_len=64)
    kv_window = perplexity(make_session(kv_model), stream, seq_len=64)  # the KV graph scores whole windows too
    cached = perplexity_cached(KVSession(kv_model), stream, seq_len=64)
    assert cached.tokens == window.tokens == kv_window.tokens
    assert abs(cached.nll - window.nll) <= 1e-5 * window.nll
    assert abs(kv_window.nll - window.nll) <= 1e-5 * window.nll


def test_cli_generate_streams_and_reports(stories_bin, capsys):
    from lowbit.api.cli import main

    assert main(["generate", str(stories_bin), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time")
    assert "prefill" in out.err and "ms/token" in out.err and "tokens/s" in out.err
    assert main(["generate", str(stories_bin), "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20",
                 "--seed", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["new_tokens"] <= 8 and res["decode_ms_per_token"] > 0
    assert main(["generate", str(stories_bin), "--top-p", "0"]) == 2


def test_chat_template_renders_messages(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lowbit.runtime.textcodec import load_codec, render_chat

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "hi"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    codec = load_codec(tmp_path)
    assert codec.eos_ids == (1,) and codec.bos_id == 0
    text = render_chat(codec, [{"role": "user", "content": "hello"}])
    assert text == "<|user|> hello <|assistant|>"
    assert codec.encode("hello hi") == [0, 4, 5]


def test_cli_eval_cache_path_equals_window(stories_bin, tinystories, capsys):
    from lowbit.api.cli import main

    common = [str(stories_bin), "--ppl", str(tinystories), "--stories", "600:601", "--seq-len", "64", "--json"]
    assert main(["eval", *common]) == 0
    window = json.loads(capsys.readouterr().out)
    assert main(["eval", *common, "--cache"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert cached["path"] == "cache" and window["path"] == "window"
    assert cached["tokens"] == window["tokens"] and abs(cached["nll"] - window["nll"]) <= 1e-5 * window["nll"]
