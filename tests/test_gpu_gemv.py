"""The CUDA GEMV (backends/cuda): its layout on CPU always; the kernel only where CuPy sees a GPU.

Expected values: codes/scales/zero points come from lowbit's own writers (``rtn.pack`` for
MatMulNBits, ``nbits_node_inputs`` for ORT's layout, ``pack3`` for MatMul3Bit) and from the random
codes they were built from; the GEMV reference is plain float64 numpy on the dequantized weight.
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.backends.cuda import layout
from lowbit.backends.nbits import nbits_node_inputs
from lowbit.ops.float_ops import pack3
from lowbit.quant import rtn


@pytest.mark.parametrize("bits,k,block", [(4, 96, 32), (4, 200, 64), (2, 128, 32), (2, 200, 128)])
def test_matmulnbits_codes_survive_the_gpu_layout(bits, k, block):
    rng = np.random.default_rng(bits * 1000 + k)
    n = 7
    g = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    s = rng.random((n, g)).astype(np.float32)
    z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
    b, s_, zp = nbits_node_inputs(codes, s, z, bits, block)
    c2, s2, z2 = layout.from_matmulnbits(b, s_, zp, k, n, bits, block)
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_array_equal(s2, s)
    w = layout.to_gpu_layout(c2, s2, z2, bits, block)
    np.testing.assert_array_equal(layout.codes_from_gpu_layout(w), codes)
    assert w.a.nbytes * 8 == w.k_padded * n * bits  # the codes stay ``bits`` wide
    assert w.k_padded % layout.CODES_PER_STEP[bits] == 0 and w.s.shape[1] * block >= w.k_padded


def test_rtn_pack_matches_its_reference_through_the_gpu_layout():
    rng = np.random.default_rng(3)
    k, n, bits, block = 256, 12, 4, 64
    wt = rng.standard_normal((k, n)).astype(np.float32)
    arrays = rtn.pack(wt, bits, block)
    codes, s, z = layout.from_matmulnbits(arrays["B"], arrays["scales"], arrays["zero_points"], k, n, bits, block)
    x = rng.standard_normal(k)
    want = x @ rtn.fake_quant(wt, bits, block).astype(np.float64)
    got = layout.reference_gemv(x, layout.codes_from_gpu_layout(layout.to_gpu_layout(codes, s, z, bits, block)),
                                s, z, block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 200, 1000])
def test_matmul3bit_stays_three_bits_and_keeps_its_codes(k):
    rng = np.random.default_rng(k)
    n, block = 5, 32
    g = -(-k // block)
    codes = rng.integers(0, 8, (n, k), dtype=np.uint8)
    s = rng.random((n, g)).astype(np.float32)
    z = rng.integers(0, 8, (n, g)).astype(np.uint8)
    c2, _, _ = layout.from_matmul3bit(pack3(codes), s, z, k)
    np.testing.assert_array_equal(c2, codes)
    w = layout.to_gpu_layout(c2, s, z, 3, block)
    np.testing.assert_array_equal(layout.codes_from_gpu_layout(w), codes)
    assert (w.a.nbytes + w.h.nbytes) * 8 == 3 * w.k_padded * n


def test_gpu_layout_refuses_what_the_kernel_cannot_run():
    with pytest.raises(ValueError, match="multiple of 32"):
        layout.to_gpu_layout(np.zeros((2, 64), np.uint8), np.ones((2, 4)), np.zeros((2, 4), np.uint8), 4, 16)
    with pytest.raises(ValueError, match="bits=8"):
        layout.to_gpu_layout(np.zeros((2, 64), np.uint8), np.ones((2, 2)), np.zeros((2, 2), np.uint8), 8, 32)


def _cuda():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:  # noqa: BLE001 - no driver or no device
        pytest.skip("no CUDA device visible to CuPy")
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    return cp


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_cuda_gemv_matches_numpy(bits):
    cp = _cuda()
    from lowbit.backends.cuda.gemv import DEFAULT_CONFIGS, CudaGemv, load_module

    rng = np.random.default_rng(bits)
    k, n, block = 2016, 1001, 32
    g = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    s = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float32)
    z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
    x = rng.standard_normal(k).astype(np.float16).astype(np.float64)
    gi = np.arange(k) // block
    wq = (codes - z[:, gi].astype(np.float64)) * s[:, gi]
    ref, bound = wq @ x, np.abs(wq) @ np.abs(x)
    mod = load_module(DEFAULT_CONFIGS)
    w = layout.to_gpu_layout(codes, s, z, bits, block)
    for cfg in DEFAULT_CONFIGS:
        y = cp.asnumpy(CudaGemv(w, cfg, mod)(x))
        assert np.all(np.abs(y - ref) <= 2e-3 * bound), cfg
