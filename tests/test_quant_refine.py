"""HQQ zero-point/scale refinement and AWQ scale search against numpy references from the papers."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.quant.gptq import dequantize, rtn_quantize
from lowbit.quant.hqq import hqq_refine


def _minmax(wg, bits):
    lo, hi = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
    s = (hi - lo) / (2 ** bits - 1)
    return s, np.round(-lo / s)


def _hqq_reference(wg, bits, s, z, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """HQQ (Badri & Shaji 2023, Alg. 1) for one group vector at a time, then integer z and least-squares s."""
    qmax = 2 ** bits - 1
    out_s, out_z = s.copy(), z.copy()
    for b in range(wg.shape[0]):
        for c in range(wg.shape[2]):
            w, sc, zp = wg[b, :, c], s[b, c], float(z[b, c])
            be = beta
            for _ in range(iters):
                q = np.clip(np.round(w / sc + zp), 0, qmax)
                r = w - (q - zp) * sc
                we = np.sign(r) * np.maximum(np.abs(r) - np.abs(r).clip(1e-12) ** (p - 1) / be, 0)
                zp = float(np.mean(q - (w - we) / sc))
                be *= kappa
            zi = float(np.clip(np.round(zp), 0, qmax))
            q = np.clip(np.round(w / sc + zi), 0, qmax)
            d = q - zi
            s2 = float(w @ d / (d @ d)) if d @ d > 0 else sc
            e_new = np.sum(((np.clip(np.round(w / s2 + zi), 0, qmax) - zi) * s2 - w) ** 2)
            e_old = np.sum(((np.clip(np.round(w / sc + z[b, c]), 0, qmax) - z[b, c]) * sc - w) ** 2)
            if e_new < e_old:
                out_s[b, c], out_z[b, c] = s2, zi
    return out_s, out_z


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_matches_reference_and_never_hurts(bits):
    rng = np.random.default_rng(bits)
    wg = rng.standard_t(3, (4, 32, 6))  # heavy tails: where the ℓp objective moves the zero point
    s, z = _minmax(wg, bits)
    got_s, got_z = hqq_refine(wg, bits, s, z)
    want_s, want_z = _hqq_reference(wg, bits, s, z)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-9)
    np.testing.assert_array_equal(got_z, want_z)
    w = wg.reshape(-1, 6)
    plain = dequantize(*rtn_quantize(w, bits, 32, False), 32)
    refined = dequantize(*rtn_quantize(w, bits, 32, False, hqq=True), 32)
    assert np.sum((refined - w) ** 2) <= np.sum((plain - w) ** 2)
    assert np.sum((refined - w) ** 2) < 0.99 * np.sum((plain - w) ** 2)  # it does change something


def test_hqq_refuses_symmetric():
    with pytest.raises(ValueError, match="symmetric"):
        rtn_quantize(np.ones((32, 2)), 3, 32, True, hqq=True)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_matches_reference_on_many_groups(bits):
    """Many (group, column) pairs, so that some rounded zero points sit next to a .5 boundary of the
    iterated z: a change inside the iteration (e.g. codes clipped at 1 instead of 0, a different
    shrinkage power) moves one of them, which the 24 groups above may not."""
    rng = np.random.default_rng(10 + bits)
    wg = rng.standard_t(3, (48, 16, 24)) + rng.normal(0, 0.5, (1, 1, 24))  # off-centre groups too
    s, z = _minmax(wg, bits)
    got_s, got_z = hqq_refine(wg, bits, s, z)
    want_s, want_z = _hqq_reference(wg, bits, s, z)
    np.testing.assert_array_equal(got_z, want_z)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-9)
    assert np.mean(got_s != s) > 0.5  # the least-squares scale replaces most min-max ones: the comparison has teeth
