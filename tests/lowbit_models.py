"""Models shared by the low-bit tests: stories260K (skipped without the shared data) and random Llamas."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lowbit.data.datasets import data_dir
from lowbit.frontends.llama2c import LlamaConfig, build_llama, read_llama2c, random_llama_weights


def stories_path():
    path = data_dir() / "stories260K" / "stories260K.bin"
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data missing: {path}")
        pytest.skip(f"shared data missing: {path}")
    return path


def stories260k():
    cfg, w = read_llama2c(stories_path())
    return build_llama(cfg, w)


def random_llama(dim=256, hidden=688, layers=2, heads=8, kv=4, vocab=512, seed=0, random_gamma=True):
    cfg = LlamaConfig(dim, hidden, layers, heads, kv, vocab, 128)
    w = random_llama_weights(cfg, seed)
    if random_gamma:  # real models have non-unit norm scales
        rng = np.random.default_rng(seed + 1)
        for k in ("attn_norm", "ffn_norm", "final_norm"):
            w[k] = (0.5 + rng.random(w[k].shape)).astype(np.float32)
    return build_llama(cfg, w)


def tokens(vocab, batch=2, seq=24, seed=0):
    return {"tokens": np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)}


def logits(model, feed):
    from lowbit.ir.sessions import make_session

    return make_session(model, optimize=False).run(None, feed)[0]


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


SMALL_LLAMA = LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def calibrated_small_llama(cfg: LlamaConfig = SMALL_LLAMA, samples: int = 4):
    """A random small Llama after calibrate{hessian=true} on random tokens, and its context."""
    from lowbit.passmanager.manager import CompileContext, PassManager

    rng = np.random.default_rng(0)
    fs = [{"tokens": rng.integers(0, cfg.vocab_size, (1, 16)).astype(np.int64)} for _ in range(samples)]
    ctx = CompileContext(calibration=fs, show_progress=False)
    model = PassManager.from_pipeline("calibrate{hessian=true}", ctx).run(build_llama(cfg, random_llama_weights(cfg)))
    return model, ctx

