"""Round-to-nearest weight quantization written from its formula in plain numpy, loop by loop, as
the independent side of tests (sensitivity, refine, packing): nothing here calls ``lowbit``.

Per output column n and group of ``group`` consecutive input channels (the whole column when
``group`` is 0 or ≥ K), with b bits and qmax = 2^b − 1, in float32 (the stored scale's type)::

    lo = min(min(w), 0), hi = max(max(w), 0)          (0 stays exactly representable)
    scale = (hi − lo) / qmax   (1 when the group is all zeros)
    zp = clip(round(−lo / scale), 0, qmax)
    q = clip(round(w / scale) + zp, 0, qmax),  ŵ = (q − zp) · scale

Symmetric (MLAS' rule, ``quantize-weights``' default): ``scale = v / −2^(b−1)``, ``zp = 2^(b−1)``
with v the group's entry of largest magnitude (the first one on a tie).  ``dtype`` is the type the
parameters and codes are computed in (``quantize-weights`` uses float64 and stores the scale as
float32; ``fake_quant``/``pack`` use float32 throughout).
"""

from __future__ import annotations

import numpy as np

__all__ = ["rtn_reference"]


def rtn_reference(w: np.ndarray, bits: int, group: int, symmetric: bool = False, dtype=np.float32) -> np.ndarray:
    """ŵ (float32, w's shape) of min-max RTN; ``bits >= 16`` keeps w."""
    w = np.asarray(w, dtype)
    if bits >= 16:
        return w.astype(np.float32)
    k, n = w.shape
    g = k if group <= 0 or group >= k else group
    qmax = dtype(2 ** bits - 1)
    out = np.empty((k, n), np.float32)
    for col in range(n):
        for start in range(0, k, g):
            v = w[start:start + g, col]
            if symmetric:
                scale = dtype(v[np.abs(v).argmax()] / dtype(-(2 ** (bits - 1))))
                zp = dtype(2 ** (bits - 1))
            else:
                lo, hi = min(dtype(v.min()), dtype(0)), max(dtype(v.max()), dtype(0))
                scale = dtype((hi - lo) / qmax)
            if scale == 0:
                scale = dtype(1)
            if not symmetric:
                zp = np.clip(np.round(dtype(-lo) / scale), 0, qmax)
            q = np.clip(np.round(v / scale) + zp, 0, qmax)
            stored = np.float32(scale)
            out[start:start + g, col] = (q - zp).astype(np.float32) * stored
    return out
