"""quantize-kv on a GroupQueryAttention graph: the op's own quantized cache (static symmetric per-channel scales,
int8, or int4 packed two per byte with +8).  Codes match a numpy re-implementation from the float graph's keys and
values, cached decode reproduces the graph's own full-sequence logits, and the cache is read back near float."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.data.datasets import kv_prefill_feed
from lowbit.errors import LowbitError
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.runtime import KVSession

CFG = LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, seq_len=64)


def _gqa():
    return build_llama(CFG, random_llama_weights(CFG, seed=1), kv_cache=True, attention_impl="gqa")


def _hadamard(n: int) -> np.ndarray:  # Sylvester, normalised: H[i, j] = (-1)^popcount(i & j) / sqrt(n)
    i = np.arange(n)
    bits = np.vectorize(lambda x: bin(x).count("1"))(i[:, None] & i[None, :])
    return (-1.0) ** bits / np.sqrt(n)


def _setup(bits: int, hadamard: bool):
    rng = np.random.default_rng(0)
    float_model = _gqa()
    feeds = [kv_prefill_feed(float_model, rng.integers(0, CFG.vocab_size, (1, 24))) for _ in range(4)]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    pipe = f"quantize-kv{{bits={bits},k_mode=channel,hadamard={str(hadamard).lower()}}}"
    return float_model, PassManager.from_pipeline(pipe, ctx).run(_gqa()), feeds, ctx


@pytest.mark.parametrize("bits,hadamard", [(8, False), (4, False), (4, True)])
def test_gqa_cache_codes_match_numpy_reference(bits, hadamard):
    float_model, model, feeds, ctx = _setup(bits, hadamard)
    hd, kv = CFG.head_dim, CFG.n_kv_heads
    past = {v.name: v for v in model.graph.inputs}
    assert past["past_key_values.0.key"].dtype == (ir.DataType.INT8 if bits == 8 else ir.DataType.UINT8)
    assert past["past_key_values.0.value"].shape[-1] == hd * bits // 8
    assert not [n for n in past if "scale" in n]  # static scales: nothing stored per token
    rep = ctx.report["quantize-kv"]
    assert rep["kernel"] == "GroupQueryAttention"
    assert (rep["float_bytes_per_token"], rep["bytes_per_token"]) == (CFG.n_layers * 2 * kv * hd * 4,
                                                                      CFG.n_layers * 2 * kv * hd * bits // 8)
    # scales from the calibration prompts: llama2.c RoPE pairs (2j, 2j+1) share the pair's largest norm (K,
    # unrotated), else the channel's largest |x|; the op's codes: clip(round(x / s), -2^(b-1), 2^(b-1) - 1)
    f_sess = make_session(float_model)
    h = _hadamard(hd) if hadamard else np.eye(hd)
    qmax = 2 ** (bits - 1) - 1
    q_sess = make_session(model)
    for j, kind in enumerate(("key", "value")):
        allx = np.concatenate([f_sess.run([f"present.0.{kind}"], fd)[0] for fd in feeds], 2) @ h
        r = np.abs(allx).max((0, 2))
        if kind == "key" and not hadamard:
            r = np.repeat(np.sqrt(allx[..., 0::2] ** 2 + allx[..., 1::2] ** 2).max((0, 2)), 2, axis=-1)
        s = np.maximum(r / qmax, 1e-8)[None, :, None]
        x = f_sess.run([f"present.0.{kind}"], feeds[1])[0] @ h
        want = np.clip(np.round(x / s), -qmax - 1, qmax)
        got = q_sess.run([f"present.0.{kind}"], kv_prefill_feed(model, feeds[1]["input_ids"]))[0]
        if bits == 4:
            got = np.stack([got & 15, got >> 4], axis=-1).reshape(*got.shape[:-1], -1).astype(int) - 8
        assert np.mean(got != want) < 1e-3 and np.max(np.abs(got.astype(int) - want)) <= 1, kind


@pytest.mark.parametrize("bits,hadamard,bound", [(8, False, 0.03), (4, True, 0.5)])
def test_gqa_quantized_cache_decode_and_read_back(bits, hadamard, bound):
    """Step-wise decode equals one prefill of the same graph (each token quantized once); on the calibration
    prompts (ranges cover every key/value) the logits stay near float (measured 0.009, and 0.16-0.36 at 4 bits
    on this random toy).  A wrong scale
    layout or an unrotated query fails the bound, not the self-consistency."""
    float_model, model, feeds, _ = _setup(bits, hadamard)
    ids = feeds[2]["input_ids"][0][:20]
    full_q = make_session(model).run(["logits"], kv_prefill_feed(model, ids[None]))[0][0]
    full_f = make_session(float_model).run(["logits"], kv_prefill_feed(float_model, ids[None]))[0][0]
    s = KVSession(model)
    got = np.concatenate([s.step(ids[:6], last_only=False)[0]] +
                         [s.step(ids[t : t + 1], last_only=False)[0] for t in range(6, 20)])
    assert np.max(np.abs(got - full_q)) <= 1e-5 * np.max(np.abs(full_q))
    assert 0 < np.max(np.abs(full_q - full_f)) / np.max(np.abs(full_f)) < bound
    assert s.cache_bytes() == 20 * CFG.n_layers * 2 * CFG.n_kv_heads * CFG.head_dim * bits // 8


def test_gqa_refuses_per_token_options():
    ctx = CompileContext(calibration=[], show_progress=False)
    with pytest.raises(LowbitError, match="static per-channel scales only"):
        PassManager.from_pipeline("quantize-kv{bits=8,k_mode=token}", ctx).run(_gqa())
