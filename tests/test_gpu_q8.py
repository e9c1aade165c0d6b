"""lowbit's int8-activation CUDA kernels (backends/cuda/q8.cu, step.cu).

On CPU always: the q8 layout keeps every code at its bit width and puts it where the kernel's masks look
(checked by a plain-Python model of the kernel's shifts/masks and dp4a, compared with the integer dot
product of the codes).  On a GPU only (skipped with a reason where CuPy, a device or nvcc is missing):
the q8 GEMV against float64 numpy within the bound int8 rounding of x allows, and the fused decode step
against a float64 numpy Llama decoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.backends.cuda import layout


def _dp4a(a: int, b: int) -> int:
    sa = np.array([a], np.uint32).view(np.int8).astype(np.int64)
    sb = np.array([b], np.uint32).view(np.int8).astype(np.int64)
    return int((sa * sb).sum())


def _kernel_block_dot(bits: int, words, hwords, sb: int, xw) -> int:
    """q8.cu's ``q8_block_dot``, written out in Python (shift, mask, dp4a)."""
    acc = 0
    if bits == 4:
        for j in range(4):
            acc += _dp4a(words[j] & 0x0F0F0F0F, xw[2 * j]) + _dp4a((words[j] >> 4) & 0x0F0F0F0F, xw[2 * j + 1])
        return acc
    hb = hwords[sb] if bits == 3 else 0
    for jj in range(2):
        ww = words[2 * sb + jj]
        for p in range(4):
            c = (ww >> (2 * p)) & 0x03030303
            if bits == 3:
                sh = 4 * jj + p
                c |= ((hb >> (sh - 2)) if sh >= 2 else ((hb << (2 - sh)) & 0xFFFFFFFF)) & 0x04040404
            acc += _dp4a(c, xw[4 * jj + p])
    return acc


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_q8_layout_feeds_the_kernel_masks_the_right_codes(bits):
    rng = np.random.default_rng(bits)
    k = 256
    codes = rng.integers(0, 1 << bits, (2, k), dtype=np.uint8)
    w = layout.to_q8_layout(codes, np.ones((2, 8), np.float32), np.zeros((2, 8), np.uint8), bits, 32)
    assert (w.a.nbytes + (0 if w.h is None else w.h.nbytes)) * 8 == bits * 2 * k  # stays `bits` wide
    np.testing.assert_array_equal(layout.codes_from_q8_layout(w), codes)
    xq = rng.integers(-127, 128, k).astype(np.int8)
    xw = xq.view(np.uint32)
    cps = layout.CODES_PER_STEP[bits]
    for row in range(2):
        for s in range(k // cps):
            words = [int(v) for v in w.a[row, s]]
            hwords = [int(v) for v in w.h[row, s]] if bits == 3 else [0, 0]
            for sb in range(cps // 32):
                kb = s * (cps // 32) + sb
                got = _kernel_block_dot(bits, words, hwords, sb, [int(v) for v in xw[8 * kb:8 * kb + 8]])
                want = int(codes[row, 32 * kb:32 * kb + 32].astype(np.int64) @ xq[32 * kb:32 * kb + 32].astype(np.int64))
                assert got == want, (row, s, sb)


def test_q8_layout_pads_k_and_refuses_odd_blocks():
    w = layout.to_q8_layout(np.ones((3, 100), np.uint8), np.ones((3, 4)), np.zeros((3, 4), np.uint8), 2, 32)
    assert w.k_padded == 128 and w.s.shape == (3, 4)
    np.testing.assert_array_equal(layout.codes_from_q8_layout(w), np.ones((3, 100), np.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        layout.to_q8_layout(np.zeros((2, 64), np.uint8), np.ones((2, 4)), np.zeros((2, 4), np.uint8), 4, 16)


def _cuda():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed (GPU kernels need it)")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:  # noqa: BLE001 - no driver or no device
        pytest.skip("no CUDA device visible to CuPy")
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    return cp


def _int8_bound(x, wq):
    kp = -(-x.shape[0] // 32) * 32
    xp = np.zeros(kp)
    xp[: x.shape[0]] = x
    half_step = np.abs(xp).reshape(-1, 32).max(1) / 254.0
    wabs = np.zeros((wq.shape[0], kp))
    wabs[:, : x.shape[0]] = np.abs(wq)
    return (wabs.reshape(wq.shape[0], -1, 32).sum(-1) * half_step).sum(1)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_q8_gemv_matches_numpy(bits):
    cp = _cuda()
    from lowbit.backends.cuda.q8 import Q8_CONFIGS, CudaGemvQ8, load_q8_module

    rng = np.random.default_rng(10 + bits)
    k, n, block = 2016, 1001, 32
    g = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    s = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float32)
    z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
    x = rng.standard_normal(k).astype(np.float16).astype(np.float64)
    gi = np.arange(k) // block
    wq = (codes - z[:, gi].astype(np.float64)) * s[:, gi]
    ref = wq @ x
    tol = _int8_bound(x, wq) + 1e-5 * (np.abs(wq) @ np.abs(x))
    mod = load_q8_module(Q8_CONFIGS)
    w = layout.to_q8_layout(codes, s, z, bits, block)
    for cfg in Q8_CONFIGS:
        y = cp.asnumpy(CudaGemvQ8(w, cfg, mod)(x)).astype(np.float64)
        assert np.all(np.abs(y - ref) <= tol), cfg


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fused_decode_step_matches_numpy_decoder(bits):
    cp = _cuda()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_step

    from lowbit.backends.cuda import step

    rng = np.random.default_rng(20 + bits)
    for ntok in (6, 40):  # 40: attention past one 32-position chunk
        err_int8, err_float = gpu_step.parity(cp, layout, step, bits, rng, ntok=ntok)
        # the int8-rounding reference is the kernel's stated arithmetic; the unrounded one only catches gross
        # errors (int8 rounding alone moves these random-weight logits by up to ~3 %, numpy against numpy)
        assert err_int8 <= 5e-3 and err_float <= 0.1, (ntok, err_int8, err_float)
