"""Mixture of data types per group (after BitMoD, Chen et al., HPCA 2025): each (group, column) of a
weight picks, from a small fixed set of ``2^b``-level grids, the one that reconstructs it best.

BitMoD's observation: a sign-magnitude low-bit float (FP3: magnitudes {0, 1, 2, 4}) spends one code on a
redundant −0.  Re-purposing that code for one *special value* gives a family of grids that differ only
there; a group stores its grid's index (2 bits) next to its scale, and the dequantizer reads
``Ŵ = s · L_t[q]``.  The 3-bit family is BitMoD's: the seven FP3 values plus one of ±3 (extra resolution,
fills the gap between 2 and 4) or ±6 (extra asymmetry, a longer tail on one side)::

    L_t = sorted({0, ±1, ±2, ±4} ∪ {v_t}),   v_t ∈ {+3, −3, +6, −6}

At 2 bits a sign-magnitude grid has three values {0, ±1}; the fourth code becomes one of ±2 (the two
asymmetric integer grids, which are what an integer zero point in {1, 2} gives), and two grids without
zero, whose two inner levels are not tied to the outer ones — the uniform ±{1, 3} and the Lloyd–Max grid
of a Gaussian (±{0.4528, 1.5104}), which a group of roughly symmetric
weights reconstructs with less squared error than any grid containing zero::

    2 bits: {−2, −1, 0, 1}, {−1, 0, 1, 2}, {−3, −1, 1, 3}, {−1.5104, −0.4528, 0.4528, 1.5104}

Parameters of one group ``w`` (``g`` values) for grid ``L``: the scale that just covers the group,
``s₀ = max(max(w)/max(L), min(w)/min(L))``, shrunk by each factor of a grid in [0.5, 1] (``clip``), codes
``q = argmin_j |w − s·L_j|``, then one least-squares refit ``s = Σ w·L_q / Σ L_q²`` kept only if it lowers
the error.  The (grid, scale) with the smallest squared error wins; with ``row_weights`` (GPTQ's
``hessian_fit``: diag(XᵀX) of the group's input channels) the error and the refit are weighted per row,
``Σ_k h_k (w_k − s·L_q(k))²``, the output error of the group when its inputs are uncorrelated.
``lowbit.quant.gptq`` uses the same per-group fit with ``dtype='mod'`` (the grid index is stored where an
integer zero point would be).

Scale storage (``scale_dtype``): ``float32``; ``float16``; or ``uint8`` — a second-level quantization of
the scales (QLoRA's double quantization, k-quants' quantized block scales): per output column a float32
step ``S_n = max_k |w_kn| / (255 · m_b)``, with ``m_b`` the smallest outermost level magnitude of the
``b``-bit grids (so the covering scale of any group of the column is at most ``255·S_n``), and each group
stores ``c = clip(round(s / S_n), 1, 255)``, ``s = c·S_n``.  The candidate scales of the fit are snapped to
what will be stored before their error is compared, so the chosen (grid, scale) is the best storable one.
A group's storage is then ``g·b`` code bits, 2 grid-index bits and 32, 16 or 8 scale bits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GRIDS", "SCALE_DTYPES", "mod_params", "mod_encode", "mod_decode", "mod_storage_bytes", "mod_layout",
           "scale_step", "scale_snapper"]

GRIDS: dict[int, np.ndarray] = {
    2: np.array([[-2, -1, 0, 1], [-1, 0, 1, 2], [-3, -1, 1, 3], [-1.5104, -0.4528, 0.4528, 1.5104]], np.float64),
    3: np.array([sorted([0, 1, -1, 2, -2, 4, -4, v]) for v in (3, -3, 6, -6)], np.float64),
}
_SHRINK = np.linspace(1.0, 0.5, 11)
SCALE_DTYPES = {"float32": 4, "float16": 2, "uint8": 1}  # bytes per stored scale


def scale_step(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-column step ``S[N]`` of ``uint8`` scales for ``w[K, N]`` (see the module doc); 1 for all-zero columns."""
    m = float(np.min(np.abs(_grid(bits)[:, [0, -1]])))
    top = np.abs(np.asarray(w, np.float64)).max(axis=0) / (255.0 * m)
    return np.where(top > 0, top, 1.0)


def scale_snapper(w: np.ndarray, bits: int, scale_dtype: str):
    """The function that maps float64 scales ``[..., N]`` of ``w``'s columns to the nearest storable ones
    (``None`` for float32)."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype}")
    if scale_dtype == "float32":
        return None
    if scale_dtype == "float16":
        tiny = float(np.finfo(np.float16).smallest_normal)
        return lambda s: np.maximum(np.asarray(s, np.float64), tiny).astype(np.float16).astype(np.float64)
    step = scale_step(w, bits)
    return lambda s: np.clip(np.rint(np.asarray(s, np.float64) / step), 1, 255) * step


def _grid(bits: int) -> np.ndarray:
    if bits not in GRIDS:
        raise ValueError(f"mixture of data types is defined for 2 and 3 bits, got {bits}")
    return GRIDS[bits]


def mod_encode(w: np.ndarray, scale: np.ndarray, types: np.ndarray, bits: int) -> np.ndarray:
    """Codes: index of the nearest level of grid ``types`` at ``scale`` (arguments broadcast), as floats."""
    levels = _grid(bits)[np.asarray(types, np.int64)]  # [..., 2^b]
    x = np.asarray(w, np.float64) / np.asarray(scale, np.float64)
    return np.abs(x[..., None] - levels).argmin(axis=-1).astype(np.float64)


def mod_decode(q: np.ndarray, scale: np.ndarray, types: np.ndarray, bits: int) -> np.ndarray:
    """``Ŵ = s · L_t[q]`` (arguments broadcast; computed in the scale's dtype)."""
    grid = _grid(bits)
    scale = np.asarray(scale)
    t = np.broadcast_to(np.asarray(types, np.int64), np.broadcast_shapes(np.shape(q), np.shape(types)))
    return (grid[t, np.asarray(q, np.int64)].astype(scale.dtype)) * scale


def _fit(wg: np.ndarray, levels: np.ndarray, clip: bool, rw, snap=None) -> tuple[np.ndarray, np.ndarray]:
    """Best scale and its (row-weighted) squared error ``[G, N]`` for one grid over ``wg[G, g, N]``."""
    hi = np.maximum(wg.max(axis=1), 0) / levels[-1]
    lo = np.minimum(wg.min(axis=1), 0) / levels[0]
    s0 = np.maximum(hi, lo)
    s0 = np.where(s0 > 0, s0, 1.0)
    best_s, best_e = s0, np.full(s0.shape, np.inf)
    for f in (_SHRINK if clip else _SHRINK[:1]):
        s = s0 * f
        x = wg / s[:, None, :]
        v = levels[np.abs(x[..., None] - levels).argmin(axis=-1)]  # L_q [G, g, N]
        den = (rw * v * v).sum(axis=1)
        for cand in (s, np.where(den > 0, (rw * wg * v).sum(axis=1) / np.maximum(den, 1e-300), s)):
            cand = np.where(cand > 0, cand, s)
            if snap is not None:
                cand = snap(cand)
            xc = wg / cand[:, None, :]
            vc = levels[np.abs(xc[..., None] - levels).argmin(axis=-1)]
            err = (rw * (vc * cand[:, None, :] - wg) ** 2).sum(axis=1)
            better = err < best_e
            best_s, best_e = np.where(better, cand, best_s), np.where(better, err, best_e)
    return best_s, best_e


def mod_params(wg: np.ndarray, bits: int, clip: bool = True, row_weights: np.ndarray | None = None, snap=None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per-(group, column) float64 scale and grid index ``[G, N]`` of ``wg[G, g, N]``; ``row_weights``
    ``[G, g]`` (e.g. the Hessian diagonal, the input's mean square per channel) weight each row's squared error;
    ``snap`` (:func:`scale_snapper`) maps candidate scales to storable ones."""
    wg = np.asarray(wg, np.float64)
    rw = 1.0 if row_weights is None else np.asarray(row_weights, np.float64)[:, :, None]
    grid = _grid(bits)
    best_s = best_t = best_e = None
    for t, levels in enumerate(grid):
        s, e = _fit(wg, levels, clip, rw, snap)
        if best_e is None:
            best_s, best_t, best_e = s, np.zeros(s.shape), e
            continue
        better = e < best_e
        best_s, best_t, best_e = np.where(better, s, best_s), np.where(better, t, best_t), np.where(better, e, best_e)
    return best_s, best_t


def mod_storage_bytes(k: int, n: int, bits: int, group: int, float_bytes: int = 4, scale_dtype: str = "") -> int:
    """Bytes ``quantize-weights{dtype=mod}`` writes for ``W[K, N]``: codes (``bits`` each, 8 per ``bits`` bytes
    over the whole K-padded tensor), grid indices (2 bits per group, packed), scales (``scale_dtype``, default
    ``float_bytes`` per group; uint8 adds the float32 step per column)."""
    g, nb = mod_layout(k, group)
    per = SCALE_DTYPES[scale_dtype] if scale_dtype else float_bytes
    return -(-nb * g * n // 8) * bits + -(-nb * n * 2 // 8) + nb * n * per + (4 * n if scale_dtype == "uint8" else 0)


def mod_layout(k: int, group: int) -> tuple[int, int]:
    """(group length, groups) along K: K is zero-padded to whole groups; group 0 (or ≥ K) is one group of K."""
    return (group, -(-k // group)) if 0 < group < k else (k, 1)
