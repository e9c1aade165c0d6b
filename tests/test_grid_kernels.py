"""lowbit's grid-form CPU kernel (``backends/kernels/lowbit_grid.c``, ``lowbit.MatMulGrid``) against numpy
references written from the formula ``W[k, n] = s[n, g] · L_t[q]`` with the grids of
:data:`lowbit.quant.mod.GRIDS` (never the kernel's integer tables):

    y[m, n] = Σ_g Σ_{k∈g} (s[n, g] · L_t[q[n, k]]) · xq[m, k] · sa[m, k // GA],
    xq = clip(rint(x · 127/amax), −127, 127) per GA = max(G, 32) inputs,  sa = amax / 127.

The integer part is bit-exact (integer grids, unit scales, activations that quantize to themselves); the
float part within 2e-6 relative, plus, for the 2-bit Lloyd–Max grid the kernel stores as 0.15104·±{3, 10},
the bound that level difference gives; the AVX-512 path bit-identical to the generic one; a real
``quantize-weights{dtype=mod,scale_dtype=uint8}`` linear gives ONNX Runtime's weights (within that bound).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lowbit.backends.kernels import cpu
from lowbit.backends.kernels.grid import (FACTORS, LEVELS, from_file_arrays, grid_bytes, grid_linear, level_error,
                                          repack_grid)
from lowbit.quant.mod import GRIDS

try:
    cpu.library()
except cpu.KernelBuildError as exc:  # pragma: no cover - CI machines have gcc: parity must run there
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"C kernels unavailable: {exc}", allow_module_level=True)

FAST = bool(cpu.library().lowbit_grid_set_fast(1))


def ref_quantize(x: np.ndarray, kp: int, ga: int):
    m, k = x.shape
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    xg = xp.reshape(m, kp // ga, ga)
    amax = np.abs(xg).max(axis=-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64).reshape(m, kp)
    return xq, np.repeat((amax / np.float32(127)).astype(np.float64), ga, axis=1)


def ref_linear(x, q, types, scales, step, bits, g):
    """float64 y and the bound the kernel's stored levels may add (0 for exact grids)."""
    n, k = q.shape
    kp = -(-k // max(g, 32)) * max(g, 32)
    xq, sa = ref_quantize(x, kp, max(g, 32))
    t = np.repeat(types, g, axis=1)[:, :k]
    s = np.repeat(scales.astype(np.float64) * (1.0 if step is None else step.astype(np.float64)[:, None]), g,
                  axis=1)[:, :k]
    w = s * GRIDS[bits][t, q]  # [N, K]
    a = xq[:, :k] * sa[:, :k]
    return a @ w.T, np.abs(a) @ np.abs(w).T * level_error(GRIDS[bits], bits)


def make(bits, n, k, g, seed=0, u8=True, type_set=4):
    rng = np.random.default_rng(seed)
    ng = -(-k // g)
    q = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    types = rng.integers(0, type_set, (n, ng))
    if u8:
        return q, types, rng.integers(1, 256, (n, ng), dtype=np.uint8), rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    return q, types, rng.uniform(0.01, 0.1, (n, ng)).astype(np.float32), None


def test_kernel_levels_are_the_grids():
    """3-bit and the integer 2-bit grids exactly; the 2-bit Lloyd–Max grid within 0.1 %."""
    for bits in (2, 3):
        k = FACTORS[bits][:, None].astype(np.float64) * LEVELS[bits]
        exact = [0, 1, 2, 3] if bits == 3 else [0, 1, 2]
        assert np.array_equal(k[exact], GRIDS[bits][exact])
    assert 0 < level_error(GRIDS[2], 2) < 1e-3


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("g", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("m,k", [(1, 256), (3, 200)])
def test_integer_part_bit_exact(bits, g, m, k):
    n = 37
    q, types, _, _ = make(bits, n, k, g, seed=bits * g + m, type_set=4 if bits == 3 else 3)
    rng = np.random.default_rng(k)
    x = rng.integers(-127, 128, (m, k)).astype(np.float32)
    x[:, ::32] = 127  # every activation group's amax is 127: sa = 1 and xq = x exactly
    ones = np.ones((n, -(-k // g)), np.uint8)
    p = repack_grid(q, types, ones, np.ones(n, np.float32), bits, g)
    want = np.einsum("mk,nk->mn", x.astype(np.int64), GRIDS[bits][np.repeat(types, g, 1)[:, :k], q].astype(np.int64))
    for fast in ([1, 0] if FAST else [0]):
        cpu.library().lowbit_grid_set_fast(fast)
        assert np.array_equal(grid_linear(p, x), want.astype(np.float32)), f"fast={fast}"
    cpu.library().lowbit_grid_set_fast(1)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("g", [8, 16, 64])
@pytest.mark.parametrize("u8", [True, False])
def test_float_result_and_paths_identical(bits, g, u8):
    m, k, n = 2, 320, 53
    q, types, scales, step = make(bits, n, k, g, seed=g + bits, u8=u8)
    x = np.random.default_rng(g).standard_normal((m, k)).astype(np.float32)
    p = repack_grid(q, types, scales, step, bits, g)
    want, bound = ref_linear(x, q, types, scales, step, bits, g)
    outs = []
    for fast in ([1, 0] if FAST else [0]):
        cpu.library().lowbit_grid_set_fast(fast)
        outs.append(grid_linear(p, x))
    cpu.library().lowbit_grid_set_fast(1)
    assert np.all(np.abs(outs[0] - want) <= bound * 1.001 + 2e-6 * np.abs(want).max())
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("bits", [2, 3])
def test_layout_bytes_are_the_files(bits):
    """bits + 10/G bits per weight (codes, uint8 scale, 2-bit grid index), as quantize-weights writes them."""
    from lowbit.quant.mod import mod_storage_bytes

    k, n, g = 2048, 512, 16
    q, types, scales, step = make(bits, n, k, g)
    p = repack_grid(q, types, scales, step, bits, g)
    assert p.nbytes == grid_bytes(k, n, bits, g)
    assert p.nbytes == mod_storage_bytes(k, n, bits, g, scale_dtype="uint8") + 4 * (-(-n // 16) * 16 - n)


@pytest.mark.parametrize("bits,group", [(2, 8), (3, 16)])
def test_recipe_linear_matches_onnxruntime(bits, group):
    """The w2a16/w3a16 form (grid, uint8 scales) that quantize-weights writes: the kernel applied to the identity
    returns the weights ONNX Runtime's MatMulGrid computes, within the stored-level bound."""
    from onnx_text import parse

    from lowbit.ir.sessions import make_session
    from lowbit.passmanager.manager import CompileContext, PassManager

    k, n = 96, 40
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"g (float[{k}, {k}] x) => (float[{k}, {n}] y) <float[{k}, {n}] w = {{{vals}}}> "
                  "{ y = MatMul (x, w) }")
    pipe = f"quantize-weights{{bits={bits},group={group},symmetric=false,dtype=mod,scale_dtype=uint8}}"
    compiled = PassManager.from_pipeline(pipe, CompileContext(show_progress=False)).run(model)
    node = next(nd for nd in compiled.graph if nd.op_type == "MatMulGrid")
    prefix = node.inputs[1].name.rsplit(".", 1)[0] + "."  # <linear>.weight_q
    arr = {v.name[len(prefix):]: v.const_value.numpy() for v in compiled.graph.initializers.values()
           if v.name.startswith(prefix)}
    p = from_file_arrays(arr["weight_q"], arr["weight_dtype"], arr["weight_scale"], arr["weight_scale_step"],
                         bits, group, k)
    eye = np.eye(k, dtype=np.float32)
    w_ort, = make_session(compiled).run(None, {"x": eye})
    got = grid_linear(p, eye)  # one-hot rows quantize exactly: row k of the result is W[k, :]
    bound = np.abs(w_ort) * level_error(GRIDS[bits], bits) * 1.001 + 1e-6 * np.abs(w_ort).max()
    assert np.all(np.abs(got - w_ort) <= bound)
    if bits == 3:
        assert np.allclose(got, w_ort, rtol=1e-6, atol=0)


def test_refuses_bad_format():
    q, types, scales, step = make(2, 16, 64, 8)
    with pytest.raises(ValueError):
        repack_grid(q, types, scales, step, 4, 8)
    with pytest.raises(ValueError):
        repack_grid(q, types, scales, step, 2, 24)
    with pytest.raises(ValueError):
        repack_grid(q, types + 4, scales, step, 2, 8)
