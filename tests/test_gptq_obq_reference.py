"""GPTQ against a textbook column-by-column OBQ/GPTQ written from the papers in plain numpy.

The reference (Frantar & Alistarh 2022, OBQ with a fixed order; Frantar et al. 2023, GPTQ §3)
quantizes one input channel at a time, propagates its error to every remaining channel through
the explicit inverse Hessian, and removes that channel from the inverse with the rank-one update
``H⁻¹ ← H⁻¹ − H⁻¹[:, i] H⁻¹[i, :] / H⁻¹[i, i]`` — no Cholesky factor, no blocks, no lazy updates,
so it shares nothing with the code under test except the min/max parameter formulas, which are
re-written here from ``lowbit.quant.rtn``'s documented formulas.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.quant.gptq import dequantize, gptq_quantize


def _params(cols: np.ndarray, bits: int, symmetric: bool):
    """Scale and zero point of the values ``cols`` [N, m] per row (min/max grid, 0 kept in range)."""
    qmax = 2 ** bits - 1
    if symmetric:
        v = cols[np.arange(cols.shape[0]), np.abs(cols).argmax(axis=1)]
        scale = v / -(2 ** (bits - 1))
        zp = np.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = np.minimum(cols.min(axis=1), 0), np.maximum(cols.max(axis=1), 0)
        scale = (hi - lo) / qmax
        zp = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, qmax)
    return np.where(scale == 0, 1.0, scale), zp


def textbook_gptq(w, h, bits, group, symmetric, act_order, damp=0.01):
    """Dequantized Ŵ [K, N] by column-by-column GPTQ (groups of ``group`` original channels)."""
    wt = np.array(w, np.float64).T.copy()
    n, k = wt.shape
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    wt[:, dead] = 0
    g = group if 0 < group < k else k
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    static = None
    if act_order or group <= 0 or group >= k:  # parameters from the unmodified weights
        static = [_params(wt[:, j * g:(j + 1) * g], bits, symmetric) for j in range(-(-k // g))]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    out = np.zeros_like(wt)
    params = {}
    for pos, c in enumerate(order):
        gi = c // g
        if static is not None:
            s, z = static[gi]
        else:
            if gi not in params:  # the group's first channel: parameters from the current weights
                params[gi] = _params(wt[:, gi * g:(gi + 1) * g], bits, symmetric)
            s, z = params[gi]
        q = np.clip(np.round(wt[:, c] / s) + z, 0, 2 ** bits - 1)
        out[:, c] = (q - z) * s
        err = (wt[:, c] - out[:, c]) / hinv[c, c]
        rest = order[pos + 1:]
        wt[:, rest] -= np.outer(err, hinv[c, rest])
        hinv = hinv - np.outer(hinv[:, c], hinv[c, :]) / hinv[c, c]
    return out.T


@pytest.mark.parametrize("group", [0, 16, 24, 48, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_column_by_column_reference(group, symmetric, act_order):
    rng = np.random.default_rng(group + 7 * symmetric + 3 * act_order)
    k, n = 136, 12  # 5 blocks of 32 (the last one partial): lazy updates cross every block boundary
    x = rng.standard_normal((600, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    x[:, 5] = 0  # a dead input channel
    h = x.T @ x
    w = rng.standard_normal((k, n)).astype(np.float32)
    bits = 3
    q, s, z = gptq_quantize(w, h, bits, group, symmetric, act_order=act_order, block=32)
    got = dequantize(q, s, z, group if group < k else 0)
    want = textbook_gptq(w, h, bits, group, symmetric, act_order)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_block_length_does_not_change_the_result():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 200))
    w = rng.standard_normal((200, 8))
    ref = gptq_quantize(w, x.T @ x, 2, 48, False)
    for block in (16, 40, 128, 256):
        for a, b in zip(ref, gptq_quantize(w, x.T @ x, 2, 48, False, block=block)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits, group", [(5, 0), (1, 0), (4, -1)])
def test_direct_calls_refuse_unsupported_bits_and_groups(bits, group):
    """The quantizers are a public API of ``lowbit.quant``: a call past the pass's Options is refused too."""
    from lowbit.quant.gptq import rtn_quantize

    w = np.random.default_rng(0).standard_normal((64, 4))
    with pytest.raises(ValueError, match="bits must be|group must be"):
        rtn_quantize(w, bits, group)
    with pytest.raises(ValueError, match="bits must be|group must be"):
        gptq_quantize(w, np.eye(64), bits, group)


def test_default_damping_is_one_percent_of_the_mean_diagonal():
    """GPTQ's default λ = 0.01·mean(diag H) (the paper's setting), on a Hessian where λ changes codes."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 4)) @ rng.standard_normal((4, 96))  # rank 4: the damping decides the inverse
    w = rng.standard_normal((96, 6))
    h = x.T @ x
    got = gptq_quantize(w, h, 3, 32, False)
    for a, b in zip(got, gptq_quantize(w, h, 3, 32, False, damp=0.01)):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(got, gptq_quantize(w, h, 3, 32, False, damp=0.011))), \
        "the case must tell 1 % from 1.1 %"


def test_the_defaults_are_the_papers_gptq():
    """``gptq_quantize(w, h, bits)``'s defaults: per-channel (group 0), symmetric, columns in their own order (no
    act-order), no clip search, λ = 1 % — the textbook GPTQ above with those settings, on a Hessian whose diagonal
    is far from sorted (act-order would reorder it and give other codes)."""
    rng = np.random.default_rng(11)
    k, n = 96, 8
    x = rng.standard_normal((500, k)) * rng.uniform(0.2, 3.0, k)
    h = x.T @ x
    w = rng.standard_normal((k, n))
    q, s, z = gptq_quantize(w, h, 3)
    np.testing.assert_allclose(dequantize(q, s, z, 0), textbook_gptq(w, h, 3, 0, True, False), rtol=1e-5, atol=1e-6)
    assert not np.allclose(textbook_gptq(w, h, 3, 0, True, True), textbook_gptq(w, h, 3, 0, True, False)), \
        "the case must tell act-order from the natural order"


def test_rtn_defaults_are_per_channel_symmetric_rtn():
    """``rtn_quantize(w, bits)``'s defaults: one group per column, symmetric (MLAS' rule), no clip search, no
    HQQ — the loop-by-loop RTN of ``tests/rtn_reference.py`` with those settings, on weights whose asymmetric
    and symmetric grids differ."""
    from lowbit.quant.gptq import rtn_quantize
    from rtn_reference import rtn_reference

    w = np.random.default_rng(12).standard_normal((64, 6)) + 0.4  # shifted: asymmetric ≠ symmetric
    got = dequantize(*rtn_quantize(w, 3), 0)
    np.testing.assert_allclose(got, rtn_reference(w, 3, 0, symmetric=True, dtype=np.float64), rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, rtn_reference(w, 3, 0, symmetric=False, dtype=np.float64), atol=1e-3)
