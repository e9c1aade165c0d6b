"""HQQ-style refinement of a group's zero point and scale (Badri & Shaji 2023, Half-Quadratic Quantization).

HQQ minimises the ℓp error (p < 1, robust to the few large weights) ``‖W − (q − z)·s‖_p`` with
half-quadratic splitting: an auxiliary error ``W_e`` takes the heavy-tailed part, and the
iteration alternates

    q   = clip(round(W/s + z), 0, 2^b − 1)
    W_e = shrink_p(W − (q − z)·s, β),   shrink_p(x, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0)
    z   = mean_group(q − (W − W_e)/s)
    β  ← κ·β

with the scale fixed.  lowbit stores integer zero points (``DequantizeLinear``/``MatMulNBits``
with uint codes), so after the iteration ``z`` is rounded, and the scale is re-fitted by least
squares for those codes: ``s = Σ W·(q − z) / Σ (q − z)²``.  Each (group, column) keeps whichever
of its starting parameters and the refined ones reconstructs ``W`` with the smaller squared error,
so the refinement never makes a group worse.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hqq_refine"]


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    ax = np.abs(x)
    return np.sign(x) * np.maximum(ax - np.power(np.maximum(ax, 1e-12), p - 1) / beta, 0)


def _sq_err(wg, s, z, qmax):
    q = np.clip(np.round(wg / s + z), 0, qmax)
    return (((q - z) * s - wg) ** 2).sum(axis=1)


def hqq_refine(wg: np.ndarray, bits: int, scale: np.ndarray, zp: np.ndarray, *, iters: int = 20, p: float = 0.7,
               beta: float = 10.0, kappa: float = 1.01) -> tuple[np.ndarray, np.ndarray]:
    """Refined ``(scale, zero point)`` ``[n_blocks, N]`` of ``wg[n_blocks, g, N]`` (float64), integer zero points."""
    qmax = (1 << bits) - 1
    wg = np.asarray(wg, np.float64)
    s = np.asarray(scale, np.float64)[:, None, :]
    z0 = np.asarray(zp, np.float64)[:, None, :]
    z = z0.copy()
    for _ in range(iters):
        q = np.clip(np.round(wg / s + z), 0, qmax)
        we = _shrink(wg - (q - z) * s, beta, p)
        z = np.mean(q - (wg - we) / s, axis=1, keepdims=True)
        beta *= kappa
    z = np.clip(np.round(z), 0, qmax)
    q = np.clip(np.round(wg / s + z), 0, qmax)
    den = ((q - z) ** 2).sum(axis=1, keepdims=True)
    s_new = np.where(den > 0, (wg * (q - z)).sum(axis=1, keepdims=True) / np.where(den > 0, den, 1), s)
    s_new = np.where(s_new == 0, s, s_new)
    better = _sq_err(wg, s_new, z, qmax) < _sq_err(wg, s, z0, qmax)
    return np.where(better, s_new[:, 0], s[:, 0]), np.where(better, z[:, 0], z0[:, 0])
