"""The hand-scheduled TIR kernels against their numpy references (CPU builds; CUDA compile only)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from lowbit.backends.tvm_kernels import TILE, has_vnni, int8_matmul_cpu, nbits_matmul_cpu  # noqa: E402
from lowbit.backends.tvm_lower import make_target  # noqa: E402
from lowbit.backends.tvm_prepare import pack_nbits  # noqa: E402


def nbits_reference(a, q, scale, zero, block):
    """The op's definition: W[k, n] = (q[k, n] - z[k // bs, n]) * s[k // bs, n]; Y = A @ W."""
    w = (q.astype(np.float64) - np.repeat(zero, block, axis=0)) * np.repeat(scale, block, axis=0)
    return a.astype(np.float64) @ w


def _codes(rng, K, N, bits, block):
    q = rng.integers(0, 1 << bits, (K, N)).astype(np.uint8)
    scale = (rng.random((K // block, N)) * 0.02 + 1e-3).astype(np.float32)
    zero = rng.integers(0, 1 << bits, (K // block, N)).astype(np.float32)
    return q, scale, zero


@pytest.mark.parametrize("bits,block,N", [(4, 32, 128), (4, 128, 200), (2, 64, 64), (8, 32, 96)])
@pytest.mark.parametrize("M", [1, 3])
def test_nbits_matmul_cpu(bits, block, N, M):
    rng = np.random.default_rng(bits * 100 + block + M)
    K = 256
    q, scale, zero = _codes(rng, K, N, bits, block)
    w, s, z = pack_nbits(q, scale, zero, bits, "tiled")
    nt = w.shape[0]
    f = tvm.compile(nbits_matmul_cpu(K, nt, bits, block), target=make_target("llvm"))
    a = rng.standard_normal((M, K)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((M, nt * TILE), np.float32), dev)
    f(*(tvm.runtime.tensor(x, dev) for x in (a, w, s, z)), out)
    ref = nbits_reference(a, q, scale, zero, block)
    got = out.numpy()
    assert np.all(got[:, N:] == 0)  # padded lanes carry zero scales
    np.testing.assert_allclose(got[:, :N], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_pack_rows_roundtrip():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        q, scale, zero = _codes(rng, 64, 8, bits, 32)
        packed, s, z = pack_nbits(q, scale, zero, bits, "rows")
        assert packed.dtype == np.uint32 and packed.shape == (8, 64 * bits // 32)
        per = 32 // bits
        unpacked = np.stack([(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], -1).reshape(8, 64)
        assert np.array_equal(unpacked.T, q) and np.array_equal(s, scale.T) and np.array_equal(z, zero.T)


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (5, 96, 192)])
def test_int8_matmul_cpu_exact(M, K, N, vnni):
    target = make_target("llvm")
    if vnni and not has_vnni(target):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(M)
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    nt = N // TILE
    bt = np.ascontiguousarray(b.reshape(K // 4, 4, nt, TILE).transpose(2, 0, 3, 1))
    corr = (128 * b.astype(np.int64).sum(0)).astype(np.int32).reshape(nt, TILE)
    f = tvm.compile(int8_matmul_cpu(K, nt, vnni), target=target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((M, N), np.int32), dev)
    f(*(tvm.runtime.tensor(x, dev) for x in (a, corr, bt)), out)
    ref = (a.astype(np.int64) - 128) @ b.astype(np.int64)  # MatMulInteger with a_zero_point = 128
    assert np.array_equal(out.numpy(), ref)


def test_nbits_cuda_compiles():
    """The CUDA form (TE + dlight) compiles for sm_90 here; it runs on the device (benchmarks/tvm_gpu.py)."""
    from lowbit.backends.tvm_kernels import nbits_gemv_module

    ex = tvm.compile(nbits_gemv_module(256, 128, 4, 32), target=make_target("cuda"))

    def sources(mod):
        for m in mod.imports:
            yield from ([m.inspect_source()] if m.kind == "cuda" else []) + list(sources(m))

    src = "".join(sources(ex.mod))
    assert "__global__" in src and "__shfl" in src  # dlight's GEMV: a warp reduction per output row
    assert "float matmul_rf_local" in src  # accumulates in float32 although activations are fp16
