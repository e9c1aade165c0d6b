"""Weight quantizers in numpy for ``quantize-weights``: round-to-nearest (RTN) with an optional
clip search, and GPTQ, grouped or per channel.

A weight ``W[K, N]`` (in × out, lowbit's MatMul layout) is cut along K into groups of ``group``
rows (``group=0``: one group of all K rows, i.e. per output channel), each (group, column) with a
scale ``s`` and an integer zero point ``z``; codes are unsigned ``q ∈ [0, 2^b − 1]`` and
``Ŵ = (q − z)·s``.  Grouping, the symmetric/asymmetric parameters, codes and ``Ŵ`` are
``lowbit.quant.rtn``'s one core (see its docstring for the formulas); here the parameters are computed
in float64 and returned as float32 scales and uint8 zero points.  ``clip_search`` shrinks the
range by a factor in [0.5, 1] chosen per (group, column) by squared error; ``hqq`` then refines each
group's zero point and scale (``lowbit.quant.hqq``, asymmetric only).

GPTQ (Frantar et al. 2022): columns of Wᵀ (input channels) are quantized in order, and each
one's rounding error is spread over the not-yet-quantized channels through the inverse Hessian
H = XᵀX (+ damping) — ``W[j:] −= err_i · Hinv[i, j:] / Hinv[i, i]`` with Hinv from the upper
Cholesky factor of H⁻¹, in blocks of 128 channels whose update to later channels is applied lazily
at the end of each block; a group whose first channel lies in a block and which runs past it gets
its parameters from weights with that block's pending update applied, so the result equals the
column-by-column algorithm at every K, group and block length.  ``act_order`` quantizes channels by
decreasing H diagonal; with groups it uses static groups (parameters from the unmodified W).
"""

from __future__ import annotations

import numpy as np

from lowbit.quant.hqq import hqq_refine
from lowbit.quant.mod import SCALE_DTYPES, mod_decode, mod_encode, mod_params, scale_snapper
from lowbit.quant.rtn import blocks, decode, encode, grouped, rtn_params

__all__ = ["rtn_quantize", "gptq_quantize", "dequantize", "group_params"]

_CLIP_GRID = np.linspace(1.0, 0.5, 11)


def group_params(w: np.ndarray, bits: int, group: int, symmetric: bool, clip_search: bool, hqq: bool = False,
                 dtype: str = "int", row_weights: np.ndarray | None = None, snap=None):
    """Per-(group, column) float64 scale and zero point ``[G, N]`` for ``w[K, N]`` (``dtype='mod'``: the
    zero point is the index of the group's grid, ``lowbit.quant.mod``; ``snap`` maps its scales to storable
    ones, :func:`lowbit.quant.mod.scale_snapper`)."""
    wg = grouped(w, group, np.float64)
    if dtype == "mod":
        rw = None if row_weights is None else grouped(np.asarray(row_weights, np.float64)[:, None], group,
                                                      np.float64)[..., 0]
        return mod_params(wg, bits, clip_search, rw, snap)
    best_s, best_z = rtn_params(wg, bits, symmetric)
    if clip_search:
        best_s, best_z = _clip_search(wg, bits, symmetric, best_s, best_z)
    if hqq:
        if symmetric:
            raise ValueError("hqq refines the zero point: it needs symmetric=false")
        best_s, best_z = hqq_refine(wg, bits, best_s, best_z)
    return best_s, best_z


def _clip_search(wg, bits, symmetric, best_s, best_z):
    best_err = np.full(best_s.shape, np.inf)
    for f in _CLIP_GRID:
        s, z = rtn_params(wg, bits, symmetric, f)
        sb, zb = s[:, None], z[:, None]
        err = ((decode(encode(wg, sb, zb, bits), sb, zb) - wg) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    return best_s, best_z


def _enc(w, s, z, bits, dtype):
    return mod_encode(w, s, z, bits) if dtype == "mod" else encode(w, s, z, bits)


def _dec(q, s, z, bits, dtype):
    return mod_decode(q, s, z, bits) if dtype == "mod" else decode(q, s, z)


def _check(bits: int, group: int, dtype: str = "int", hqq: bool = False, scale_dtype: str = "float32") -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if dtype not in ("int", "mod"):
        raise ValueError(f"dtype must be int or mod, got {dtype}")
    if dtype == "mod" and (bits not in (2, 3) or hqq):
        raise ValueError("dtype=mod (mixture of data types) is defined for 2 and 3 bits, without hqq")
    if group < 0:
        raise ValueError(f"group must be >= 0, got {group}")
    if scale_dtype not in SCALE_DTYPES or (scale_dtype != "float32" and dtype != "mod"):
        raise ValueError(f"scale_dtype {scale_dtype}: float16/uint8 scales are a dtype=mod storage form")


def rtn_quantize(w: np.ndarray, bits: int, group: int = 0, symmetric: bool = True, clip_search: bool = False,
                 hqq: bool = False, dtype: str = "int", scale_dtype: str = "float32"):
    """Round to nearest: (codes uint8 [K, N], scales float32 [G, N], zero points (or grid indices) uint8 [G, N]);
    ``scale_dtype`` (dtype=mod): the scales are storable as float16 or uint8 (``lowbit.quant.mod``)."""
    _check(bits, group, dtype, hqq, scale_dtype)
    w = np.asarray(w, np.float64)
    s, z = group_params(w, bits, group, symmetric, clip_search, hqq, dtype, snap=scale_snapper(w, bits, scale_dtype)
                        if dtype == "mod" else None)
    rows = np.arange(w.shape[0]) // blocks(w.shape[0], group)[0]
    q = _enc(w, s[rows], z[rows], bits, dtype)
    return q.astype(np.uint8), s.astype(np.float32), z.astype(np.uint8)


def dequantize(q: np.ndarray, scales: np.ndarray, zps: np.ndarray, group: int, bits: int = 0,
               dtype: str = "int") -> np.ndarray:
    """Ŵ[K, N] = (q − z)·s (``dtype='mod'``: s·L_z[q]) with the group of row k being k // group (all rows when
    group=0)."""
    rows = np.arange(q.shape[0]) // blocks(q.shape[0], group)[0]
    return _dec(q, np.asarray(scales, np.float32)[rows], zps[rows], bits, dtype)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, group: int = 0, symmetric: bool = True,
                  clip_search: bool = False, act_order: bool = False, damp: float = 0.01, block: int = 128,
                  hqq: bool = False, dtype: str = "int", hessian_fit: bool = False, scale_dtype: str = "float32"):
    """GPTQ with Hessian ``XᵀX`` [K, K]; returns what ``rtn_quantize`` returns.  ``hessian_fit`` (dtype=mod):
    each group's grid and scale minimise the diag(XᵀX)-weighted squared error; ``scale_dtype`` as in
    :func:`rtn_quantize` (the step of uint8 scales comes from the unmodified ``w``)."""
    _check(bits, group, dtype, hqq, scale_dtype)
    snap = scale_snapper(np.asarray(w, np.float64), bits, scale_dtype) if dtype == "mod" else None
    wt = np.array(np.asarray(w, np.float64).T)  # [N, K]: rows = output channels
    n, k = wt.shape
    h = np.array(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match the weight's {k} input channels")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    g = blocks(k, group)[0]
    hd = np.diag(h).copy() if hessian_fit else None
    static = None
    if group <= 0 or act_order:  # parameters fixed up front (per channel, or static groups)
        static = group_params(wt.T, bits, group, symmetric, clip_search, hqq, dtype, hd, snap)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wt, h = wt[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor U with U^T U = H^-1
    except np.linalg.LinAlgError as exc:
        raise ValueError("the damped Hessian is not positive definite; raise damp") from exc
    gidx = perm // g  # group of each processed column (original index)
    q_out = np.zeros((n, k))
    s_all = np.zeros((blocks(k, group)[1], n)) if static is None else static[0]
    z_all = np.zeros_like(s_all) if static is None else static[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is None and col % g == 0:  # new group: parameters from the updated weights
                stop = min(col + g, k)
                cur = w1[:, i:min(stop, i2) - i1]
                if stop > i2:  # the group runs past this block: apply the block's pending (lazy) update first
                    ahead = wt[:, i2:stop] - err1[:, :i] @ hinv[i1:col, i2:stop]
                    cur = np.concatenate([cur, ahead], axis=1)
                s, z = group_params(cur.T, bits, 0, symmetric, clip_search, hqq, dtype,
                                    None if hd is None else hd[perm][col:stop], snap)
                s_all[col // g], z_all[col // g] = s[0], z[0]
            gi = gidx[col]
            wcol = w1[:, i]
            qc = _enc(wcol, s_all[gi], z_all[gi], bits, dtype)
            q_out[:, col] = qc
            deq = _dec(qc, s_all[gi], z_all[gi], bits, dtype)
            e = (wcol - deq) / hinv1[i, i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            err1[:, i] = e
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = np.zeros_like(q_out)
    q[:, perm] = q_out
    return q.T.astype(np.uint8), s_all.astype(np.float32), z_all.astype(np.uint8)
