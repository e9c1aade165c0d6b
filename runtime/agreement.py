"""Agreement between a float model and its compiled form on the same inputs."""

from __future__ import annotations

import numpy as np

from lowbit.runtime.llm import log_softmax

__all__ = ["causal_agreement", "embedding_agreement"]


def causal_agreement(float_sess, quant_sess, stream: np.ndarray, seq_len: int = 256, windows: int = 16) -> dict:
    """Next-token top-1 agreement and mean KL(float ‖ compiled) over the first windows of ``stream``."""
    name = float_sess.get_inputs()[0].name
    agree = total = 0
    kl = 0.0
    for i in range(0, min(len(stream) - 1, windows * seq_len), seq_len):
        x = stream[i : i + seq_len][None]
        a = float_sess.run(None, {name: x})[0]
        b = quant_sess.run(None, {quant_sess.get_inputs()[0].name: x})[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[1]
        la, lb = log_softmax(a), log_softmax(b)
        kl += float((np.exp(la) * (la - lb)).sum())
    return {"top1_agreement": agree / max(total, 1), "kl_nats_per_token": kl / max(total, 1), "positions": total}


def embedding_agreement(float_emb: np.ndarray, quant_emb: np.ndarray) -> dict:
    cos = (float_emb * quant_emb).sum(axis=1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "sentences": int(cos.size)}
