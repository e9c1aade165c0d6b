"""Round-to-nearest weight quantization written from its formula in plain numpy, loop by loop, as
the independent side of tests (sensitivity, refine, packing): nothing here calls ``lowbit``.

Per output column n and group of ``group`` consecutive input channels (the whole column when
``group`` is 0 or ≥ K), with b bits and qmax = 2^b − 1, in float32 (the stored scale's type)::

    lo = min(min(w), 0), hi = max(max(w), 0)          (0 stays exactly representable)
    scale = (hi − lo) / qmax   (1 when the group is all zeros)
    zp = clip(round(−lo / scale), 0, qmax)
    q = clip(round(w / scale) + zp, 0, qmax),  ŵ = (q − zp) · scale
"""

from __future__ import annotations

import numpy as np

__all__ = ["rtn_reference"]


def rtn_reference(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """ŵ (float32, w's shape) of asymmetric min-max RTN; ``bits >= 16`` keeps w."""
    w = np.asarray(w, np.float32)
    if bits >= 16:
        return w.copy()
    k, n = w.shape
    g = k if group <= 0 or group >= k else group
    qmax = np.float32(2 ** bits - 1)
    out = np.empty_like(w)
    for col in range(n):
        for start in range(0, k, g):
            v = w[start:start + g, col]
            lo, hi = min(np.float32(v.min()), np.float32(0)), max(np.float32(v.max()), np.float32(0))
            scale = np.float32((hi - lo) / qmax)
            if scale == 0:
                scale = np.float32(1)
            zp = np.clip(np.round(np.float32(-lo) / scale), 0, qmax)
            q = np.clip(np.round(v / scale) + zp, 0, qmax)
            out[start:start + g, col] = (q - zp).astype(np.float32) * scale
    return out
