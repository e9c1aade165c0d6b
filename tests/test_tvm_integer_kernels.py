"""lowbit's integer TIR kernels one by one (CPU builds), bit for bit against plain-numpy formulas written
from the ops' definitions (int64 arithmetic, no lowbit code): the int8 GEMM with its dyadic requantize,
in its VNNI and portable forms, with and without the row tail of its register blocking."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from lowbit.backends.tvm_integer_kernels import TILE, int8_matmul_requantize_cpu  # noqa: E402
from lowbit.backends.tvm_kernels import has_vnni  # noqa: E402
from lowbit.backends.tvm_lower import make_target  # noqa: E402

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def _run(func, target, *arrays, out):
    dev = tvm.cpu()
    f = tvm.compile(tvm.IRModule({"main": func}), target=target)
    res = tvm.runtime.tensor(out, dev)
    f["main"](*(tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in arrays), res)
    return res.numpy()


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("M,K,nt,dt", [(14, 64, 2, "int16"), (8, 96, 1, "uint8"), (3, 128, 3, "int8")])
def test_int8_matmul_requantize_exact(M, K, nt, dt, vnni):
    """Y = clip(((A·W − C)·b + 2^(c−1)) >> c + zp) per output channel, C = a_zp·colsum(W) − offset."""
    target = make_target("llvm")
    if vnni and not has_vnni(target):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(M * K + nt)
    N = nt * TILE
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    corr = rng.integers(-50000, 50000, N).astype(np.int32)
    lo, hi = RANGES[dt]
    b = rng.integers(1 << 12, 1 << 13, N).astype(np.int64)
    spread = 128 * 74 * np.sqrt(K) * (1 << 13) / (hi - lo)  # |acc| ≈ 128·74·√K: map its spread onto the range
    c = (int(np.log2(spread)) + rng.integers(-1, 2, N)).astype(np.int64)
    zp = rng.integers(lo // 4, hi // 4 + 1, N).astype(dt)
    packed = w.reshape(K // 4, 4, nt, TILE).transpose(2, 0, 3, 1)  # [tile, k/4, lane, 4]
    got = _run(int8_matmul_requantize_cpu(K, nt, dt, vnni), target, a, corr.reshape(nt, TILE), packed, b, c, zp,
               out=np.zeros((M, N), dt))
    acc = a.astype(np.int64) @ w.astype(np.int64) - corr
    ref = np.clip(((acc * b + (1 << (c - 1))) >> c) + zp.astype(np.int64), lo, hi).astype(dt)
    assert np.array_equal(got, ref)
    assert len(np.unique(got)) > 20  # neither saturated nor constant
