"""The objectives that smooth's α search and migrate-steps' ρ search minimise, against the W8A8 error
written here from the papers in plain numpy, on data chosen to reach every branch of the simulator:
an all-positive activation (the range must still include 0: ``lo = min(x.min(), 0)``), an
all-negative one, codes that sit at 0 and 255 (the clip bounds), an all-zero weight column.

A search is only as good as its objective: a simulator that clips at the wrong code, drops the zero
point or forgets to keep 0 in range ranks α/ρ on the wrong numbers, and the search's choice on a
single test case often does not flip.  So the objective itself is compared, on every case, with
a tight tolerance (both sides are float64 sums of the same terms).
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.passes import migrate_steps, smooth

C, N = 12, 7


def smoothquant_w8a8_error(rows, weights, s):
    """SmoothQuant's setting (Xiao et al. 2023): X/s as static per-tensor asymmetric uint8 with a range
    that contains 0; diag(s)·W as per-output-channel symmetric int8 (codes in [-127, 127])."""
    x = rows / s
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    step = (hi - lo) / 255 if hi > lo else 1.0
    zp = np.round(-lo / step)
    xq = (np.clip(np.round(x / step) + zp, 0, 255) - zp) * step
    total = 0.0
    for w in weights:
        ws = w * s[:, None]
        amax = np.abs(ws).max(axis=0)
        sw = np.where(amax > 0, amax / 127, 1.0)
        wq = np.clip(np.round(ws / sw), -127, 127) * sw
        total += float(((rows @ w - xq @ wq) ** 2).sum())
    return total


def qsm_w8a8_error(rows, weights, s, z):
    """MergeQuant's static per-channel uint8 activations (step s_j, zero point z_j) times per-output-
    channel int8 weights of diag(s)·W (scales rounded to float32, as the weights are stored)."""
    xq = np.clip(np.round(rows / s) + z, 0, 255) - z
    total = 0.0
    for w in weights:
        ws = (w * s[:, None]).astype(np.float32)
        amax = np.abs(ws).max(axis=0)
        sw = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        wq = np.clip(np.round(ws / sw), -127, 127)
        total += float(((rows @ w - (xq @ wq) * sw) ** 2).sum())
    return total


def _cases():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, C)) * (1 + 4 * (np.arange(C) == 3))
    w = rng.standard_normal((C, N)) * 0.3
    w0 = w.copy()
    w0[:, 2] = 0.0  # an all-zero output column
    return {
        "mixed signs": (base, [w, rng.standard_normal((C, 3)) * 0.5]),
        "all positive": (np.abs(base) + 0.5, [w]),  # x.min() > 0: 0 must still be in the range
        "all negative": (-np.abs(base) - 0.5, [w]),
        "zero column": (base, [w0]),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_smooth_alpha_objective_is_the_w8a8_error(name):
    rows, weights = CASES[name]
    rng = np.random.default_rng(1)
    for s in (np.ones(C), 0.25 + rng.random(C) * 4):
        want = smoothquant_w8a8_error(rows, weights, s)
        got = smooth._fake_quant_error(rows, weights, s)
        assert got == pytest.approx(want, rel=1e-9), f"{name}: α-search objective {got} vs reference {want}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_smooth_objective_float32_with_shared_outputs(name):
    """The search's fast form (float32 products, ``rows @ w`` computed once and passed as ``refs``) is the
    same objective: equal to the float64 reference up to float32 rounding (a relative 1e-5 here, where a
    wrong step, zero point or a ``refs`` that is not ``rows @ w`` moves it by more than 1e-3), and the
    held-out form with sliced ``refs`` equals the one that recomputes them."""
    rows, weights = CASES[name]
    rng = np.random.default_rng(2)
    r32, w32 = rows.astype(np.float32), [w.astype(np.float32) for w in weights]
    refs = [r32 @ w for w in w32]
    for s in (np.ones(C), 0.25 + rng.random(C) * 4):
        want = smoothquant_w8a8_error(rows, weights, s)
        got = smooth._fake_quant_error(r32, w32, s, refs=refs)
        assert got == pytest.approx(want, rel=1e-5), f"{name}: float32 objective {got} vs reference {want}"
    scales = lambda xmax: np.sqrt(np.maximum(xmax, 1e-3))  # noqa: E731
    w64 = [w.astype(np.float64) for w in weights]
    assert smooth.held_out_error(rows, w64, scales, refs=[rows @ w for w in w64]) == pytest.approx(
        smooth.held_out_error(rows, w64, scales), rel=1e-12)


def test_smooth_objective_cases_reach_every_branch():
    """The cases have power: keeping 0 in range and the clip both change the reference on them."""
    rows, weights = CASES["all positive"]
    x = rows
    lo, hi = x.min(), x.max()  # a range without 0: a different step and zero point
    step = (hi - lo) / 255
    xq = (np.clip(np.round(x / step) + np.round(-lo / step), 0, 255) - np.round(-lo / step)) * step
    wrong = sum(float(((x @ w - xq @ (np.round(w / (np.abs(w).max(0) / 127)) * (np.abs(w).max(0) / 127))) ** 2)
                      .sum()) for w in weights)
    assert abs(wrong / smoothquant_w8a8_error(rows, weights, np.ones(C)) - 1) > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ratio", [1, 4, 1024])
def test_migrate_rho_objective_is_the_w8a8_error(name, ratio):
    rows, weights = CASES[name]
    lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
    a = (hi - lo) / 255
    s = np.exp2(np.ceil(np.log2(np.maximum(a, a.max() / ratio))))  # the balancing rule, written out
    z = np.clip(np.round(-lo / s), 0, 255)
    np.testing.assert_array_equal(migrate_steps.balanced_steps(a, ratio), s)
    np.testing.assert_array_equal(migrate_steps.channel_qparams(lo, hi, s), z.astype(np.uint8))
    want = qsm_w8a8_error(rows, weights, s, z)
    got = migrate_steps._error(rows, weights, s, z.astype(np.uint8))
    assert got == pytest.approx(want, rel=1e-9), f"{name}, ρ={ratio}: ρ-search objective {got} vs reference {want}"


def test_migrate_cases_put_codes_on_both_clip_bounds():
    """Codes at 0 and at 255 occur (a clip at 1 or 254 would change the objective)."""
    rows, _ = CASES["mixed signs"]
    lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
    s = np.exp2(np.ceil(np.log2((hi - lo) / 255)))
    z = np.clip(np.round(-lo / s), 0, 255)
    q = np.clip(np.round(rows / s) + z, 0, 255)
    assert (q == 0).any()
    q_hi = np.clip(np.round(rows / ((hi - lo) / 255)) + np.round(-lo / ((hi - lo) / 255)), 0, 255)
    assert (q_hi == 255).any()
