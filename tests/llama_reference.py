"""An independent numpy forward of a llama2.c checkpoint, written from run.c's loop.

It processes one position at a time with a KV cache, the way run.c does, so it shares no code
or structure with the ONNX graph it checks.
"""

from __future__ import annotations

import numpy as np


def _rmsnorm(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x) + eps) * w


def forward(cfg, w, tokens):
    """Logits [len(tokens), vocab] for one sequence, in float64."""
    d, hd, H, KV = cfg.dim, cfg.dim // cfg.n_heads, cfg.n_heads, cfg.n_kv_heads
    w = {k: v.astype(np.float64) for k, v in w.items()}
    kcache = np.zeros((cfg.n_layers, len(tokens), KV * hd))
    vcache = np.zeros_like(kcache)
    out = []
    for pos, tok in enumerate(tokens):
        x = w["embed"][tok].copy()
        for layer in range(cfg.n_layers):
            xb = _rmsnorm(x, w["attn_norm"][layer])
            q, k, v = w["q"][layer] @ xb, w["k"][layer] @ xb, w["v"][layer] @ xb
            for vec in (q, k):
                for i in range(0, vec.size, 2):
                    freq = 1.0 / 10000.0 ** ((i % hd) / hd)
                    c, s = np.cos(pos * freq), np.sin(pos * freq)
                    a, b = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = a * c - b * s, a * s + b * c
            kcache[layer, pos], vcache[layer, pos] = k, v
            att_out = np.zeros(d)
            for h in range(H):
                kvh = h // (H // KV)
                qh = q[h * hd:(h + 1) * hd]
                keys = kcache[layer, : pos + 1, kvh * hd:(kvh + 1) * hd]
                scores = keys @ qh / np.sqrt(hd)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hd:(h + 1) * hd] = p @ vcache[layer, : pos + 1, kvh * hd:(kvh + 1) * hd]
            x = x + w["o"][layer] @ att_out
            xb = _rmsnorm(x, w["ffn_norm"][layer])
            a, b = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (a / (1 + np.exp(-a)) * b)
        out.append(w["head"] @ _rmsnorm(x, w["final_norm"]))
    return np.stack(out)
