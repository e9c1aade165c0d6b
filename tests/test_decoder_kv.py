"""The KV-cache form of lowbit.frontends.decoder: cached decoding equals the full-sequence graph."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.frontends.decoder import kv_input_names, kv_output_names
from lowbit.frontends.llama2c import LlamaConfig, build_llama, llama2c_spec, random_llama_weights, read_llama2c
from lowbit.ir.sessions import make_session


def decode_stepwise(sess, ids: np.ndarray, chunks: list[int], n_layers: int, kv_heads: int, head_dim: int,
                    pad: int = 0) -> np.ndarray:
    """Logits for ``ids`` [batch, seq] fed through the cache in pieces of ``chunks`` tokens.

    ``pad`` left-pads every row with that many masked tokens (id 0) in the first chunk."""
    b = ids.shape[0]
    past = {f"past_key_values.{i}.{k}": np.zeros((b, kv_heads, 0, head_dim), np.float32)
            for i in range(n_layers) for k in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    mask = np.zeros((b, 0), np.int64)
    outs, start = [], 0
    for n in chunks:
        new = ids[:, start:start + n]
        m = np.ones_like(new)
        if pad and start == 0:
            new = np.concatenate([np.zeros((b, pad), np.int64), new], axis=1)
            m = np.concatenate([np.zeros((b, pad), np.int64), m], axis=1)
        mask = np.concatenate([mask, m], axis=1)
        position = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -new.shape[1]:]
        res = sess.run(None, {"input_ids": new, "attention_mask": mask, "position_ids": position, **past})
        outs.append(res[0][:, -n:])
        past = {nm.replace("present", "past_key_values"): r for nm, r in zip(names[1:], res[1:])}
        start += n
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("impl", ["plain", "expand", "onnx", "gqa"])
def test_stories260k_cached_decode_reproduces_full_logits(stories_bin, impl):
    cfg, w = read_llama2c(stories_bin)
    ids = np.array([[1, 403, 407, 261, 378, 439, 270, 303, 414, 362, 310, 285, 408, 282, 419, 271, 344]])
    full = make_session(build_llama(cfg, w)).run(None, {"tokens": ids})[0]
    kv = make_session(build_llama(cfg, w, kv_cache=True, attention_impl=impl))
    got = decode_stepwise(kv, ids, [4] + [1] * 13, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    assert np.max(np.abs(got - full)) <= 1e-5 * np.max(np.abs(full))


def test_kv_interface_names_shapes_and_padding():
    cfg = LlamaConfig(dim=48, hidden_dim=64, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=40, seq_len=64)
    w = random_llama_weights(cfg, seed=3)
    model = build_llama(cfg, w, kv_cache=True)
    spec = llama2c_spec(cfg)
    assert [v.name for v in model.graph.inputs] == kv_input_names(spec)
    assert [v.name for v in model.graph.outputs] == kv_output_names(spec)
    assert model.metadata_props["lowbit.kv_cache"] == "true"
    sess = make_session(model)
    ids = np.random.default_rng(0).integers(0, 40, (2, 7))
    full = make_session(build_llama(cfg, w)).run(None, {"tokens": ids})[0]
    # left padding of 3 masked tokens with positions from the mask: same logits for the real tokens
    got = decode_stepwise(sess, ids, [3, 1, 1, 2], cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, pad=3)
    assert np.max(np.abs(got - full)) <= 1e-5 * np.max(np.abs(full))
    res = sess.run(None, {"input_ids": ids[:, :1], "attention_mask": np.ones((2, 1), np.int64),
                          "position_ids": np.zeros((2, 1), np.int64),
                          **{n: np.zeros((2, 2, 0, 8), np.float32) for n in kv_input_names(spec)[3:]}})
    assert res[0].shape == (2, 1, 40) and all(r.shape == (2, 2, 1, 8) for r in res[1:])


def test_load_model_kv_option(stories_bin, stories_tok):
    model = lowbit.load_model(stories_bin, tokenizer=stories_tok, kv_cache=True)
    assert "past_key_values.4.value" in [v.name for v in model.graph.inputs]
    assert model.metadata_props["lowbit.tokenizer"].endswith("tok512.bin")


def test_kv_cache_on_a_model_without_past_is_refused(stories_model, tmp_path):
    path = lowbit.save_onnx(stories_model, tmp_path / "m.onnx")
    with pytest.raises(lowbit.errors.LowbitError, match="no past key/value inputs"):
        lowbit.load_model(path, kv_cache=True)


def test_output_check_feeds_a_kv_graph_consistently(tmp_path):
    """RTN needs no calibration, so the output check runs a synthetic feed: on a KV graph its past must be
    empty (past + sequence = the mask's length); it used to fail with 'broadcast 4 by 5'."""
    cfg = LlamaConfig(dim=48, hidden_dim=64, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=40, seq_len=64)
    model = build_llama(cfg, random_llama_weights(cfg, seed=3), kv_cache=True)
    out = tmp_path / "kv.w4a16.onnx"
    result = lowbit.compile(model, recipe="w4a16", output=out, progress=False)
    assert out.exists() and result.report
    sess = make_session(lowbit.load_model(out))
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]

