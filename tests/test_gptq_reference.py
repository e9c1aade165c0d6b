"""GPTQ through ``calibrate{hessian=true},quantize-weights{method=gptq}`` at K = 512 (four blocks of
128 channels) against a textbook column-by-column GPTQ written here from Frantar et al. (2022),
Algorithm 1 without lazy batching, and against round-to-nearest written here too.

Nothing here calls lowbit's quantizers: the Hessian is XᵀX of the feeds in numpy, and the
quantized weight Ŵ is read back by running the compiled model on the identity matrix.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.passmanager.manager import CompileContext
from onnx_text import ort_outputs, parse, run

K, N, BITS, GROUP = 512, 48, 4, 128
QMAX = 2 ** BITS - 1


def _model(w: np.ndarray):
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    return parse(f"""
        g (float[b, {K}] x) => (float[b, {N}] y) <float[{K}, {N}] w = {{{vals}}}> {{ y = MatMul (x, w) }}""")


def _feeds(seed=0, n=8, rows=96):
    """Correlated inputs (a low-rank mix plus noise, a few loud channels): GPTQ has something to exploit."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((64, K)) / 8
    loud = np.ones(K)
    loud[rng.choice(K, 16, replace=False)] = 6.0
    return [{"x": ((rng.standard_normal((rows, 64)) @ mix + 0.3 * rng.standard_normal((rows, K))) * loud)
             .astype(np.float32)} for _ in range(n)]


def _minmax(wcols: np.ndarray):
    """Asymmetric min-max parameters per output channel of ``wcols`` [N, g] (0 kept in range)."""
    lo, hi = np.minimum(wcols.min(axis=1), 0), np.maximum(wcols.max(axis=1), 0)
    scale = np.where(hi > lo, (hi - lo) / QMAX, 1.0)
    return scale, np.clip(np.round(-lo / scale), 0, QMAX)


def _q(x, scale, zero):
    return (np.clip(np.round(x / scale) + zero, 0, QMAX) - zero) * scale


def textbook_gptq(w: np.ndarray, h: np.ndarray, damp=0.01, cross_block=True, block=128) -> np.ndarray:
    """Ŵ [K, N]; groups of GROUP input channels take parameters from the weights as updated so far."""
    W = w.T.astype(np.float64).copy()  # [N, K]
    H = h.astype(np.float64).copy()
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: UᵀU = H⁻¹
    Q = np.zeros_like(W)
    for i in range(K):
        if i % GROUP == 0:
            scale, zero = _minmax(W[:, i:i + GROUP])
        Q[:, i] = _q(W[:, i], scale, zero)
        err = (W[:, i] - Q[:, i]) / U[i, i]
        end = K if cross_block else (i // block + 1) * block  # the "bug": stop at the block edge
        W[:, i + 1:end] -= np.outer(err, U[i, i + 1:end])
    return Q.T


def rtn(w: np.ndarray) -> np.ndarray:
    out = np.zeros_like(w, np.float64)
    for g0 in range(0, K, GROUP):
        scale, zero = _minmax(w[g0:g0 + GROUP].T.astype(np.float64))
        out[g0:g0 + GROUP] = _q(w[g0:g0 + GROUP].T, scale[:, None], zero[:, None]).T
    return out


def output_error(w, wq, h):
    d = (wq - w).astype(np.float64)
    return float(np.trace(d.T @ h @ d))


@pytest.fixture(scope="module")
def case():
    w = (np.random.default_rng(1).standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    feeds = _feeds()
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    h = x.T @ x
    ctx = CompileContext(calibration=feeds, show_progress=False)
    model, _ = run(_model(w), f"calibrate{{hessian=true}},quantize-weights{{bits={BITS},group={GROUP},method=gptq,"
                              f"symmetric=false}}", ctx)
    w_hat = ort_outputs(model, {"x": np.eye(K, dtype=np.float32)})[0].astype(np.float64)
    return w.astype(np.float64), h, w_hat


def test_the_case_reaches_every_block(case):
    w, h, _ = case
    assert K // 128 >= 4
    assert np.abs(textbook_gptq(w, h) - textbook_gptq(w, h, cross_block=False)).max() > 0


def test_gptq_matches_the_textbook_algorithm(case):
    w, h, w_hat = case
    ref = textbook_gptq(w, h)
    same = np.isclose(w_hat, ref, rtol=1e-5, atol=1e-6).mean()
    assert same > 0.99, f"only {same:.3%} of the weights equal the textbook GPTQ's"
    assert output_error(w, w_hat, h) == pytest.approx(output_error(w, ref, h), rel=0.02)


def test_gptq_halves_the_output_error_of_rtn(case):
    w, h, w_hat = case
    e_rtn, e_gptq = output_error(w, rtn(w), h), output_error(w, w_hat, h)
    e_local = output_error(w, textbook_gptq(w, h, cross_block=False), h)
    assert e_gptq < 0.75 * e_rtn, (e_gptq / e_rtn)
    assert e_gptq < 0.9 * e_local, "GPTQ without the cross-block update would be about as good"


def test_rtn_reference_matches_quantize_weights_rtn(case):
    w, _, _ = case
    model, _ = run(_model(w.astype(np.float32)), f"quantize-weights{{bits={BITS},group={GROUP},symmetric=false}}")
    w_hat = ort_outputs(model, {"x": np.eye(K, dtype=np.float32)})[0]
    np.testing.assert_allclose(w_hat, rtn(w), rtol=1e-5, atol=1e-6)


def textbook_gptq_act_order(w: np.ndarray, h: np.ndarray, damp=0.01) -> np.ndarray:
    """act_order: channels by decreasing H diagonal; groups keep the parameters of the unmodified W."""
    perm = np.argsort(-np.diag(h), kind="stable")
    params = [_minmax(w[g0:g0 + GROUP].T.astype(np.float64)) for g0 in range(0, K, GROUP)]
    W = w.T.astype(np.float64)[:, perm].copy()
    H = h[np.ix_(perm, perm)].astype(np.float64).copy()
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.zeros_like(W)
    for i in range(K):
        scale, zero = params[perm[i] // GROUP]
        Q[:, i] = _q(W[:, i], scale, zero)
        W[:, i + 1:] -= np.outer((W[:, i] - Q[:, i]) / U[i, i], U[i, i + 1:])
    out = np.zeros_like(Q)
    out[:, perm] = Q
    return out.T


def test_act_order_matches_the_textbook(case):
    w, h, _ = case
    feeds = _feeds()
    model, _ = run(_model(w.astype(np.float32)), f"calibrate{{hessian=true}},quantize-weights{{bits={BITS},"
                                                 f"group={GROUP},method=gptq,symmetric=false,act_order=true}}",
                   CompileContext(calibration=feeds, show_progress=False))
    w_hat = ort_outputs(model, {"x": np.eye(K, dtype=np.float32)})[0].astype(np.float64)
    ref = textbook_gptq_act_order(w, h)
    assert np.isclose(w_hat, ref, rtol=1e-5, atol=1e-6).mean() > 0.99
    assert output_error(w, w_hat, h) < 0.75 * output_error(w, rtn(w), h)


def test_clip_search_picks_the_least_squares_range(case):
    """RTN with clip_search: per (group, column) the range factor in {1, 0.95, …, 0.5} of least squared error."""
    w, _, _ = case
    model, _ = run(_model(w.astype(np.float32)),
                   f"quantize-weights{{bits={BITS},group={GROUP},symmetric=false,clip_search=true}}")
    w_hat = ort_outputs(model, {"x": np.eye(K, dtype=np.float32)})[0].astype(np.float64)
    ref = np.zeros_like(w)
    for g0 in range(0, K, GROUP):
        blk = w[g0:g0 + GROUP].T  # [N, g]
        best, best_err = None, np.full(N, np.inf)
        for f in np.linspace(1.0, 0.5, 11):
            lo, hi = np.minimum(blk.min(1), 0) * f, np.maximum(blk.max(1), 0) * f
            scale = (hi - lo) / QMAX
            zero = np.clip(np.round(-lo / scale), 0, QMAX)
            q = _q(blk, scale[:, None], zero[:, None])
            err = ((q - blk) ** 2).sum(1)
            take = err < best_err
            best = q if best is None else np.where(take[:, None], q, best)
            best_err = np.where(take, err, best_err)
        ref[g0:g0 + GROUP] = best.T
    assert np.isclose(w_hat, ref, rtol=1e-5, atol=1e-6).mean() > 0.99
    assert ((w_hat - w) ** 2).sum() < ((rtn(w) - w) ** 2).sum()
