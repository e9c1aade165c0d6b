"""lowbit's C kernels (backends/kernels) against a plain-numpy reference written from the formula

    y[m, n] = Σ_g (D[m, n, g] · (s[n, g] · sa[m, g])),  D = Σ_{k∈g} (c[n, k] − z[n, g]) · xq[m, k],
    xq = clip(rint(x · 127/amax_g), −127, 127),  sa = amax_g / 127,

on unpacked codes (never the kernels' layout): the integer part bit-exact (unit scales make y the exact
integer sum), the float part within 2e-6 relative, and every instruction-set path on this CPU
bit-identical to the others.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lowbit.backends.kernels import cpu
from lowbit.backends.kernels.layout import packed_bytes, repack

try:
    cpu.library()
except cpu.KernelBuildError as exc:  # pragma: no cover - CI machines have gcc: parity must run there
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"C kernels unavailable: {exc}", allow_module_level=True)

PATHS = [name for code, name in cpu.ISA_NAMES.items() if code <= cpu.library().lowbit_best_isa()]


def ref_quantize(x: np.ndarray, kp: int, g: int):
    m, k = x.shape
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    xg = xp.reshape(m, kp // g, g)
    amax = np.abs(xg).max(axis=-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64)
    return xq, (amax / np.float32(127)).astype(np.float32)


def ref_linear(x, codes, scales, zeros, bits, g, exact_ints=False):
    """float64 reference (or the exact integer D summed over groups when ``exact_ints``)."""
    n, k = codes.shape
    ng = -(-k // g)
    kp = ng * g
    xq, sa = ref_quantize(x, kp, g)
    c = np.zeros((n, kp), np.int64)
    c[:, :k] = codes
    z = np.full((n, ng), 1 << (bits - 1), np.int64) if zeros is None else zeros.astype(np.int64)
    d = np.einsum("mgk,ngk->mng", xq, c.reshape(n, ng, g)) - z[None] * xq.sum(-1)[:, None, :]
    if exact_ints:
        return d.sum(-1)
    return (d * (scales.astype(np.float64)[None] * sa.astype(np.float64)[:, None, :])).sum(-1)


def make(bits, n, k, g, seed=0, asym=True):
    rng = np.random.default_rng(seed)
    ng = -(-k // g)
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, ng)).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, (n, ng), dtype=np.uint8) if asym else None
    return codes, scales, zeros


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    cpu.library().lowbit_set_isa(cpu.library().lowbit_best_isa())
    cpu.set_threads(0)


# groups of 16 exist for 2/3-bit codes only (stored in pairs of groups)
_SHAPES = [(bits, k, g) for bits in (2, 3, 4, 8) for k, g in [(200, 64), (100, 32), (1100, 512), (104, 16)]
           if g != 16 or bits <= 3]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("bits,k,g", _SHAPES)  # small groups; zero-point product in 32 bits
def test_integer_part_bit_exact(path, bits, m, k, g):
    _integer_part_bit_exact(path, bits, m, k, g)


def _integer_part_bit_exact(path, bits, m, k, g):
    n = 40  # N not a multiple of 16, K not a multiple of the group
    codes, _, zeros = make(bits, n, k, g, seed=bits * 10 + m)
    p = repack(codes, np.ones((n, -(-k // g)), np.float32), zeros, bits, g)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    xq, xs, xsum = cpu.quantize_act(x, p.kp, g)
    ref_q, ref_sa = ref_quantize(x, p.kp, g)
    np.testing.assert_array_equal(xq.reshape(ref_q.shape), ref_q)
    np.testing.assert_array_equal(xs, ref_sa)
    np.testing.assert_array_equal(xsum, ref_q.sum(-1))
    cpu.set_isa(path)
    y = cpu.gemm_q(p, xq, np.ones_like(xs), xsum)  # unit scales: y = Σ_g D exactly (|y| < 2^24)
    np.testing.assert_array_equal(y.astype(np.int64), ref_linear(x, codes, None, zeros, bits, g, exact_ints=True))


@pytest.mark.parametrize("bits,g", [(2, 32), (3, 32), (4, 32), (8, 32), (2, 16), (3, 16)])
@pytest.mark.parametrize("asym", [True, False])
def test_float_result_and_paths_identical(bits, g, asym):
    n, k = 70, 240
    codes, scales, zeros = make(bits, n, k, g, seed=bits, asym=asym)
    p = repack(codes, scales, zeros, bits, g)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    ref = ref_linear(x, codes, scales, zeros, bits, g)
    outs = {}
    for path in PATHS:
        cpu.set_isa(path)
        outs[path] = cpu.linear(p, x)
        np.testing.assert_allclose(outs[path], ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    for path in PATHS[1:]:
        np.testing.assert_array_equal(outs[path], outs[PATHS[0]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_bytes(bits):
    """3 bits stay 3 bits: codes take K·N·bits/8 bytes; scales/zeros 5 bytes per row and group."""
    n, k, g = 48, 256, 128
    p = repack(*make(bits, n, k, g), bits, g)
    assert p.codes.nbytes == n * k * bits // 8
    assert p.nbytes == packed_bytes(k, n, bits, g) == n * k * bits // 8 + n * (k // g) * 5


def test_refuses_bad_format():
    codes, scales, zeros = make(4, 16, 64, 32)
    with pytest.raises(ValueError, match="group 48"):
        repack(codes, scales, zeros, 4, 48)
    with pytest.raises(ValueError, match="group 16"):  # 4-bit: multiples of 32 only
        repack(*make(4, 16, 64, 16), 4, 16)
    with pytest.raises(ValueError, match="5-bit"):
        repack(codes, scales, zeros, 5, 32)
    with pytest.raises(ValueError, match="exceed 2 bits"):
        repack(codes, scales, zeros, 2, 32)


@pytest.mark.parametrize("heads,kv,d,pos,cap", [(8, 2, 16, 5, 12), (32, 4, 64, 20, 24)])  # one thread; heads threaded
def test_decode_helpers_match_numpy(heads, kv, d, pos, cap):
    """lowbit_decode.c: RMSNorm, RoPE + cache append + GQA attention, SwiGLU against their formulas."""
    lib, rng = cpu.library(), np.random.default_rng(5)
    cpu.set_threads(2)
    x = rng.standard_normal(64).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    y = np.empty(64, np.float32)
    lib.lowbit_rmsnorm(64, x.ctypes.data, w.ctypes.data, 1e-5, y.ctypes.data)
    np.testing.assert_allclose(y, x / np.sqrt((x.astype(np.float64) ** 2).mean() + 1e-5) * w, rtol=1e-5)
    qkv = rng.standard_normal((heads + 2 * kv) * d).astype(np.float32)
    kc, vc = (rng.standard_normal((kv, cap, d)).astype(np.float32) for _ in range(2))
    ang = pos * 10000.0 ** (-np.arange(d // 2) / (d // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ref_k, ref_v = kc.copy(), vc.copy()

    def rope(v):  # [h, d]
        a, b = v[:, : d // 2], v[:, d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], 1)

    q = rope(qkv[: heads * d].reshape(heads, d))
    ref_k[:, pos] = rope(qkv[heads * d:(heads + kv) * d].reshape(kv, d))
    ref_v[:, pos] = qkv[(heads + kv) * d:].reshape(kv, d)
    out, scratch = np.empty(heads * d, np.float32), np.empty(cap, np.float32)
    lib.lowbit_rope_attend(heads, kv, d, pos, cap, qkv.ctypes.data, cos.ctypes.data, sin.ctypes.data, kc.ctypes.data,
                           vc.ctypes.data, out.ctypes.data, scratch.ctypes.data)
    np.testing.assert_allclose(kc, ref_k, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vc, ref_v)
    for h in range(heads):
        g = h // (heads // kv)
        s = ref_k[g, : pos + 1] @ q[h] / np.sqrt(d)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[h * d:(h + 1) * d], (p / p.sum()) @ ref_v[g, : pos + 1], rtol=1e-5, atol=1e-6)
    gu = rng.standard_normal(2 * 64).astype(np.float32)
    act = np.empty(64, np.float32)
    lib.lowbit_swiglu(64, gu.ctypes.data, act.ctypes.data)
    np.testing.assert_allclose(act, gu[:64] / (1 + np.exp(-gu[:64].astype(np.float64))) * gu[64:], rtol=1e-5)
    n = 5000  # past the threaded size, a partial last chunk
    gu = rng.standard_normal(2 * n).astype(np.float32)
    act = np.empty(n, np.float32)
    lib.lowbit_swiglu(n, gu.ctypes.data, act.ctypes.data)
    np.testing.assert_allclose(act, gu[:n] / (1 + np.exp(-gu[:n].astype(np.float64))) * gu[n:], rtol=1e-5)


def test_work_pool_threads_and_concurrent_callers():
    """lowbit_pool.c: every tile is computed exactly once whatever the thread count (1, 2, 3 threads give
    bit-identical outputs, equal to the reference's exact integers), and callers on several host threads
    at once (one runs on the pool, the others inline) each get their own correct result."""
    import threading

    bits, g, n, k = 4, 32, 1000, 256  # 63 tiles: many chunks, a partial last tile
    codes, _, zeros = make(bits, n, k, g, seed=3)
    p = repack(codes, np.ones((n, k // g), np.float32), zeros, bits, g)
    xs_ = [np.random.default_rng(i).standard_normal((1, k)).astype(np.float32) for i in range(4)]
    refs = []
    for x in xs_:
        xq, xs, xsum = cpu.quantize_act(x, p.kp, g)
        refs.append((xq, xs, xsum, ref_linear(x, codes, None, zeros, bits, g, exact_ints=True)))
    for th in (1, 2, 3):
        cpu.set_threads(th)
        for xq, xs, xsum, ref in refs:
            np.testing.assert_array_equal(cpu.gemm_q(p, xq, np.ones_like(xs), xsum).astype(np.int64), ref)
    cpu.set_threads(2)
    errors = []

    def worker(i):
        xq, xs, xsum, ref = refs[i]
        for _ in range(30):
            y = cpu.gemm_q(p, xq, np.ones_like(xs), xsum)
            if not np.array_equal(y.astype(np.int64), ref):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_stream_read_sums_every_word_once():
    """The bandwidth probe's chunks (work pool) cover the buffer exactly: its sum is the numpy sum."""
    a = np.random.default_rng(0).integers(0, 1 << 40, 3 * (1 << 14) + 5, dtype=np.uint64)  # a partial chunk
    cpu.set_threads(2)
    assert cpu.library().lowbit_stream_read(a.ctypes.data, a.size, 3) == 3 * int(a.sum(dtype=np.uint64))
