"""Mixture of data types per group (BitMoD-style, ``quantize-weights{dtype=mod}``) against a plain-numpy
reference written from the paper's definition: each group picks the grid and scale of least squared error."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.gptq import dequantize, gptq_quantize, rtn_quantize
from lowbit.quant.mod import GRIDS, mod_storage_bytes
from lowbit_models import random_llama, rel_err, tokens


def _bitmod_fp3() -> list[list[float]]:
    """BitMoD's 3-bit types: FP3 (sign + magnitudes 0, 1, 2, 4) whose redundant −0 code holds ±3 or ±6."""
    basic = sorted({s * m for s in (1, -1) for m in (0, 1, 2, 4)})
    return [sorted(basic + [v]) for v in (3, -3, 6, -6)]


def _ref_group(w: np.ndarray, grids, h=None, factors=np.linspace(1.0, 0.5, 11),
               snap=lambda s: s) -> tuple[float, int, float]:
    """(scale, grid, error) of one group by the definition: per grid, the covering scale shrunk by
    1, 0.95, …, 0.5, nearest level, and the least-squares rescale for those levels; smallest error wins.
    ``h``: per-row weights of the squared error (and of the least-squares rescale); ``snap``: the storable
    scale nearest to a candidate (each candidate is judged as it will be stored)."""
    h = np.ones_like(w) if h is None else h
    best = (None, None, np.inf)
    for t, lv in enumerate(grids):
        lv = np.asarray(lv, np.float64)
        s0 = max(max(w.max(), 0) / lv[-1], min(w.min(), 0) / lv[0])
        s0 = s0 if s0 > 0 else 1.0
        for f in factors:
            s = s0 * f
            v = lv[[int(np.argmin(np.abs(x / s - lv))) for x in w]]
            cands = [s] + ([float((h * w) @ v / ((h * v) @ v))] if v @ v > 0 else [])
            for c in cands:
                if c <= 0:
                    continue
                c = snap(c)
                vc = lv[[int(np.argmin(np.abs(x / c - lv))) for x in w]]
                err = float((h * (c * vc - w) ** 2).sum())
                if err < best[2]:
                    best = (c, t, err)
    return best


def _two_bit_grids() -> list[list[float]]:
    """The two integer grids an integer zero point in {1, 2} gives, the uniform ±{1, 3} and the 4-level
    Lloyd–Max quantizer of N(0, 1) (Max 1960: ±0.4528, ±1.5104)."""
    return [[-2, -1, 0, 1], [-1, 0, 1, 2], [-3, -1, 1, 3], [-1.5104, -0.4528, 0.4528, 1.5104]]


def test_two_bit_grids_are_the_documented_ones_and_lloyd_max_is_a_fixed_point():
    from math import erf, erfc, exp, pi, sqrt

    assert GRIDS[2].tolist() == _two_bit_grids()
    a, b = _two_bit_grids()[3][2:]
    t = (a + b) / 2  # Lloyd–Max: thresholds at midpoints, levels at the conditional means of N(0, 1)
    pdf = lambda x: exp(-x * x / 2) / sqrt(2 * pi)  # noqa: E731
    assert (pdf(0) - pdf(t)) / (erf(t / sqrt(2)) / 2) == pytest.approx(a, abs=2e-4)  # E[X | 0 < X < t]
    assert pdf(t) / (erfc(t / sqrt(2)) / 2) == pytest.approx(b, abs=2e-4)  # E[X | X > t]


def test_three_bit_grids_are_bitmods():
    assert GRIDS[3].tolist() == _bitmod_fp3()
    for grid in GRIDS.values():  # every grid has 2^b distinct ascending levels
        assert all(np.all(np.diff(row) > 0) for row in grid)


@pytest.mark.parametrize("bits,clip", [(2, True), (3, True), (2, False), (3, False)])
def test_rtn_mod_matches_the_reference(bits, clip):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((32, 6)) * np.exp(rng.standard_normal(6))
    w[:16, 2] += 1.5  # a skewed group
    q, s, t = rtn_quantize(w, bits, 16, symmetric=False, clip_search=clip, dtype="mod")
    got = dequantize(q, s, t, 16, bits, "mod")
    for gi in range(2):
        for c in range(6):
            ws = w[gi * 16:(gi + 1) * 16, c]
            scale, grid, err = _ref_group(ws, _bitmod_fp3() if bits == 3 else _two_bit_grids(),
                                          factors=np.linspace(1.0, 0.5, 11) if clip else [1.0])  # no clip: covering scale
            assert t[gi, c] == grid
            assert s[gi, c] == pytest.approx(scale, rel=1e-6)
            assert ((got[gi * 16:(gi + 1) * 16, c] - ws) ** 2).sum() == pytest.approx(err, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_mixture_beats_integer_grids_on_gaussian_groups(bits):
    w = np.random.default_rng(0).standard_normal((256, 64))
    e_int = ((dequantize(*rtn_quantize(w, bits, 16, symmetric=False, clip_search=True), 16) - w) ** 2).sum()
    e_mod = ((dequantize(*rtn_quantize(w, bits, 16, symmetric=False, clip_search=True, dtype="mod"), 16, bits,
                         "mod") - w) ** 2).sum()
    assert e_mod < 0.92 * e_int


def test_gptq_with_mixture_lowers_the_output_error_of_rtn_and_of_integer_gptq():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64)) * 0.3
    w = rng.standard_normal((64, 48))
    h = x.T @ x
    for act_order in (False, True):
        qg = dequantize(*gptq_quantize(w, h, 2, 16, False, True, act_order, dtype="mod"), 16, 2, "mod")
        qr = dequantize(*rtn_quantize(w, 2, 16, False, True, dtype="mod"), 16, 2, "mod")
        qi = dequantize(*gptq_quantize(w, h, 2, 16, False, True, act_order), 16)
        err = np.linalg.norm(x @ (qg - w))
        assert err < 0.9 * np.linalg.norm(x @ (qr - w))
        assert err < 0.95 * np.linalg.norm(x @ (qi - w))


def _ref_decode(q, s, t, bits, group):
    grids = np.asarray(_bitmod_fp3() if bits == 3 else _two_bit_grids())
    rows = np.arange(q.shape[0]) // group
    return np.asarray(s, np.float32)[rows] * grids[t[rows].astype(int), q.astype(int)].astype(np.float32)


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 16), (3, 0)])  # group 0: one group per column (all K)
def test_graph_computes_the_numpy_weights_and_stores_what_it_counts(bits, group):
    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    feed = tokens(128, seq=12)
    weights = {lin.name: lin.weight.const_value.numpy().copy() for lin in find_linears(model.graph)}
    qmodel = PassManager.from_pipeline(f"quantize-weights{{bits={bits},group={group},symmetric=false,dtype=mod}}",
                                       CompileContext(show_progress=False)).run(model)
    ref = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    counted = written = 0
    for lin in find_linears(ref.graph):
        w = weights[lin.name]
        q, s, t = rtn_quantize(w, bits, group, symmetric=False, dtype="mod")
        lin.weight.const_value = ir.tensor(_ref_decode(q, s, t, bits, group or w.shape[0]))
        counted += mod_storage_bytes(*w.shape, bits, group)
        written += sum(qmodel.graph.initializers[f"{lin.name}.{k}"].const_value.nbytes
                       for k in ("weight_q", "weight_dtype", "weight_scale"))
    assert written == counted
    got = make_session(qmodel, optimize=False).run(None, feed)[0]
    want = make_session(ref, optimize=False).run(None, feed)[0]
    assert rel_err(got, want) < 1e-5


def test_hessian_weighted_fit_matches_the_reference():
    from lowbit.quant.mod import mod_params

    rng = np.random.default_rng(7)
    wg = rng.standard_normal((2, 16, 5))
    hd = np.exp(2 * rng.standard_normal((2, 16)))  # a few input channels dominate
    s, t = mod_params(wg, 2, True, hd)
    for gi in range(2):
        for c in range(5):
            scale, grid, _ = _ref_group(wg[gi, :, c], _two_bit_grids(), hd[gi])
            assert t[gi, c] == grid and s[gi, c] == pytest.approx(scale, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_codes_pack_eight_per_bits_bytes_little_endian(bits):
    from lowbit.ops.grid_ops import pack_codes, unpack_codes

    codes = np.random.default_rng(bits).integers(0, 1 << bits, 77)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == 10 * bits  # ⌈77/8⌉ words of `bits` bytes
    word = sum(int(packed[j]) << (8 * j) for j in range(bits))  # the first word, by hand
    assert [(word >> (bits * i)) & ((1 << bits) - 1) for i in range(8)] == codes[:8].tolist()
    assert unpack_codes(packed, bits, 77).tolist() == codes.tolist()


def test_group_of_eight_only_with_the_grid_form():
    from lowbit.passes.quantize_weights import QuantizeWeights

    with pytest.raises(ValueError, match="group=8 needs dtype=mod"):
        QuantizeWeights.Options(bits=2, group=8)
    assert QuantizeWeights.Options(bits=2, group=8, symmetric=False, dtype="mod").group == 8


def _ref_uint8_snap(col: np.ndarray, bits: int):
    """Double quantization of the scales (QLoRA §3; k-quants' 8-bit block scales): a float step per column,
    ``S = max|w| / (255 · m)`` with m the smallest outermost level magnitude of the grids (BitMoD 2-bit: the
    integer grids {-2..1}/{-1..2} reach only 1 on their short side; 3-bit: 4), scales ``S · clip(round(s/S), 1, 255)``."""
    m = {2: 1.0, 3: 4.0}[bits]
    step = np.abs(col).max() / (255 * m)
    return lambda s: float(np.clip(np.rint(s / step), 1, 255) * step)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("scale_dtype", ["float16", "uint8"])
def test_stored_scales_match_the_reference(bits, scale_dtype):
    rng = np.random.default_rng(11 + bits)
    w = rng.standard_normal((32, 5)) * np.exp(rng.standard_normal(5))
    w[:8, 1] *= 0.02  # a group far below its column's largest: coarse uint8 steps matter there
    q, s, t = rtn_quantize(w, bits, 8, symmetric=False, clip_search=True, dtype="mod", scale_dtype=scale_dtype)
    grids = np.asarray(_bitmod_fp3()) if bits == 3 else GRIDS[2]
    for c in range(w.shape[1]):
        snap = (_ref_uint8_snap(w[:, c], bits) if scale_dtype == "uint8"
                else lambda v: float(np.float16(v)))
        for gi in range(4):
            scale, grid, _ = _ref_group(w[gi * 8:(gi + 1) * 8, c], grids, snap=snap)
            assert t[gi, c] == grid and s[gi, c] == pytest.approx(scale, rel=1e-6)
    if scale_dtype == "float16":
        assert np.array_equal(s.astype(np.float16).astype(np.float32), s)


def test_gptq_keeps_its_scales_storable_and_refuses_them_without_the_grid_form():
    from lowbit.passes.quantize_weights import QuantizeWeights

    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 32))
    w = rng.standard_normal((32, 6))
    q, s, t = gptq_quantize(w, x.T @ x, 2, 8, False, True, dtype="mod", hessian_fit=True, scale_dtype="uint8")
    step = np.abs(w).max(axis=0) / 255
    codes = s / step
    assert np.allclose(codes, np.rint(codes), atol=1e-3) and codes.min() >= 1 - 1e-3 and codes.max() <= 255 + 1e-3
    with pytest.raises(ValueError, match="scale_dtype"):
        gptq_quantize(w, x.T @ x, 4, 8, False, True, scale_dtype="uint8")
    with pytest.raises(ValueError, match="storage form of dtype=mod"):
        QuantizeWeights.Options(bits=4, group=32, scale_dtype="float16")


@pytest.mark.parametrize("scale_dtype", ["float16", "uint8"])
def test_graph_with_small_scales_computes_the_numpy_weights_and_stores_what_it_counts(scale_dtype):
    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    feed = tokens(128, seq=12)
    weights = {lin.name: lin.weight.const_value.numpy().copy() for lin in find_linears(model.graph)}
    qmodel = PassManager.from_pipeline(f"quantize-weights{{bits=2,group=8,symmetric=false,dtype=mod,"
                                       f"scale_dtype={scale_dtype}}}", CompileContext(show_progress=False)).run(model)
    ref = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    counted = written = 0
    for lin in find_linears(ref.graph):
        w = weights[lin.name]
        q, s, t = rtn_quantize(w, 2, 8, symmetric=False, dtype="mod", scale_dtype=scale_dtype)
        lin.weight.const_value = ir.tensor(_ref_decode(q, s, t, 2, 8))
        counted += mod_storage_bytes(*w.shape, 2, 8, scale_dtype=scale_dtype)
        inits = qmodel.graph.initializers
        written += sum(inits[f"{lin.name}.{k}"].const_value.nbytes
                       for k in ("weight_q", "weight_dtype", "weight_scale", "weight_scale_step")
                       if f"{lin.name}.{k}" in inits)
        assert inits[f"{lin.name}.weight_scale"].const_value.dtype == {"float16": ir.DataType.FLOAT16,
                                                                       "uint8": ir.DataType.UINT8}[scale_dtype]
    assert written == counted
    for optimize in (False, True):  # the scale subgraph folds to the same weights
        got = make_session(qmodel, optimize=optimize).run(None, feed)[0]
        want = make_session(ref, optimize=False).run(None, feed)[0]
        assert rel_err(got, want) < 1e-5
