"""Sentence-embedding evaluation: mean pooling, STS Spearman, for any ONNX BERT-style encoder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["embed", "sts_spearman", "mean_pool"]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embed(session, tokenizer_dir: str | Path, sentences: list[str], batch: int = 32, max_length: int = 128,
          progress: bool = False) -> np.ndarray:
    """L2-normalised mean-pooled embeddings of ``sentences``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    names = [i.name for i in session.get_inputs()]
    out = []
    for i in tqdm(range(0, len(sentences), batch), desc="embed", disable=not progress, leave=False):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feed = {n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64) for n in names}
        hidden = session.run(None, feed)[0]
        out.append(mean_pool(hidden, enc["attention_mask"]))
    return np.concatenate(out)


def sts_spearman(session, tokenizer_dir, pairs_a: list[str], pairs_b: list[str], scores: np.ndarray,
                 progress: bool = False) -> tuple[float, np.ndarray]:
    """Spearman ×100 between cosine similarity and gold scores; also returns the embeddings."""
    from scipy.stats import spearmanr

    ea = embed(session, tokenizer_dir, pairs_a, progress=progress)
    eb = embed(session, tokenizer_dir, pairs_b, progress=progress)
    cos = (ea * eb).sum(axis=1)
    return float(spearmanr(cos, scores).statistic * 100), np.concatenate([ea, eb])
