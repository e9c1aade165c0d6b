"""lowbit.IntNorm / lowbit.IntSoftmax: references vs the float formulas, ORT lowerings vs references (bit for bit)."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.rewrite import add_initializer
from lowbit.ir.sessions import make_session
from lowbit.ops.integer_nonlinear import exp_table, int_norm_reference, int_softmax_reference, isqrt_newton
from lowbit.ops.registry import DOMAIN, OPS


def _lowered_session(op: str, inputs: list[tuple[str, ir.DataType]], consts: list[np.ndarray | None], attrs: dict,
                     n_in: int):
    """A graph holding one lowbit ``op`` (runtime inputs first, then constants), lowered by its registered lowering."""
    vals = [ir.Value(name=n, type=ir.TensorType(t)) for n, t in inputs]
    graph = ir.Graph(vals, [], nodes=[], opset_imports={"": 21, DOMAIN: 1}, name="g")
    cvals = [add_initializer(graph, f"c{i}", c) if c is not None else None for i, c in enumerate(consts)]
    args = vals[:n_in] + cvals + vals[n_in:]
    node = ir.Node(DOMAIN, op, args, attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()], name="op")
    graph.append(node)
    out = OPS[op].lower(graph, node, "test")
    graph.remove(node, safe=False)
    graph.outputs.append(out)
    return make_session(ir.Model(graph, ir_version=10), optimize=False)


def test_newton_isqrt_equals_exact_isqrt():
    rng = np.random.default_rng(0)
    lo, hi = 1 << 58, 1 << 62  # the range the body scales n into
    edges = [v for i in range(64, 1024) for v in ((i << 52) - 1, i << 52, (i << 52) + 1)]
    squares = [k * k + d for k in (2 ** 29, 2 ** 29 + 1, 3 * 2 ** 28 + 7, 2 ** 31 - 1) for d in (-1, 0, 1)]
    n = np.array([v for v in edges + squares if lo <= v < hi], np.int64)
    n = np.concatenate([n, rng.integers(lo, hi, 200000), np.exp2(rng.uniform(58, 62, 100000)).astype(np.int64)])
    n = n[(n >= lo) & (n < hi)]
    want = np.array([math.isqrt(int(v)) for v in n], np.int64)
    assert np.array_equal(isqrt_newton(n), want)
    assert not np.array_equal(isqrt_newton(n, steps=1), want)  # the step count matters: the test can fail


def _float_norm(x, zx, gamma, beta, rms, eps_units):
    xf = x.astype(np.float64) - (zx if rms else 0)
    if rms:
        return gamma * xf / np.sqrt(np.maximum((xf ** 2).mean(-1, keepdims=True), eps_units)) + beta
    mu = xf.mean(-1, keepdims=True)
    return gamma * (xf - mu) / np.sqrt(np.maximum(((xf - mu) ** 2).mean(-1, keepdims=True), eps_units)) + beta


@pytest.mark.parametrize("rms", [0, 1])
@pytest.mark.parametrize("xdt,odt", [(np.int16, np.uint8), (np.int8, np.int8), (np.uint8, np.int16)])
def test_int_norm_reference_follows_the_float_formula(rms, xdt, odt):
    rng = np.random.default_rng(1)
    c, m_bits, shift = 96, 20, 36
    lo, hi = np.iinfo(xdt).min, np.iinfo(xdt).max
    x = rng.integers(lo // 4, hi // 4, (50, c)).astype(xdt)
    x[:, :3] = rng.integers(lo, hi, (50, 3))  # outlier channels
    zx = np.asarray(3 if xdt != np.int8 else -2, xdt)
    gamma, beta = rng.uniform(0.2, 2.0, c), rng.normal(0, 0.5, c)
    step = rng.uniform(0.01, 0.03, c)  # per-channel output steps
    zo = np.asarray(int(np.iinfo(odt).max) // 3, odt)
    g = np.round(gamma / step * 2.0 ** (shift - m_bits)).astype(np.int64)
    bias = np.round(beta / step * 2.0 ** shift).astype(np.int64)
    got = int_norm_reference(x, zx, g, bias, zo, rms=rms, frac_bits=m_bits, shift=shift, n_min=1)
    # independent float64 formula; the integer form's n units are C²·var (LayerNorm) or mean(x²) (RMSNorm)
    want = np.clip(np.round(_float_norm(x, int(zx), gamma, beta, rms, 1.0 / (c * c if not rms else 1)) / step)
                   + int(zo), np.iinfo(odt).min, np.iinfo(odt).max)
    diff = np.abs(got.astype(np.int64) - want)
    assert got.dtype == odt and diff.max() <= 1 and diff.mean() < 0.05


@pytest.mark.parametrize("rms", [0, 1])
@pytest.mark.parametrize("xdt,odt", [(np.int16, np.uint8), (np.int8, np.int8), (np.uint8, np.int16),
                                     (np.int32, np.uint8)])
def test_int_norm_ort_lowering_is_bit_exact(rms, xdt, odt):
    rng = np.random.default_rng(2)
    c = 64
    zx = np.asarray(0 if xdt == np.int32 else 5, xdt)
    g = rng.integers(-3000, 3000, c).astype(np.int64)
    bias = rng.integers(-2 ** 34, 2 ** 34, c).astype(np.int64)
    zo = np.asarray(7, odt)
    attrs = {"rms": rms, "frac_bits": 20, "shift": 28, "n_min": 16}
    sess = _lowered_session("IntNorm", [("x", ir.DataType.from_numpy(np.dtype(xdt)))], [zx, g, bias, zo], attrs, 1)
    info = np.iinfo(xdt) if xdt != np.int32 else np.iinfo(np.int16)
    for scale in (1.0, 0.05, 0.002):  # wide, narrow and near-constant rows (n_min clips)
        x = (rng.integers(info.min, info.max, (3, 17, c)) * scale).astype(xdt)
        x[0, 0] = x[0, 0, 0]  # a constant row
        got = sess.run(None, {"x": x})[0]
        want = int_norm_reference(x, zx, g, bias, zo, **attrs)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_int_norm_refuses_overflowing_operands():
    x = np.full((1, 4096), 32767, np.int16)
    x[0, ::2] = -32768
    with pytest.raises(ValueError):
        int_norm_reference(x, np.asarray(0, np.int16), np.ones(4096, np.int64), np.zeros(4096, np.int64),
                           np.asarray(0, np.int8))


def test_int_softmax_reference_follows_softmax():
    rng = np.random.default_rng(3)
    s = 0.07
    x = rng.integers(-128, 128, (40, 33)).astype(np.int8)
    keep = rng.random((40, 33)) < 0.8
    keep[:, 0] = True
    got = int_softmax_reference(x, exp_table(s), keep)
    z = np.where(keep, x.astype(np.float64) * s, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert got.dtype == np.uint8 and np.all(got[~keep] == 0)
    assert np.abs(got / 255.0 - p).max() <= 1.5 / 255  # table rounding (2^-15) and output rounding (1/510)


@pytest.mark.parametrize("xdt", [np.int8, np.uint8])
@pytest.mark.parametrize("masked", [False, True])
def test_int_softmax_ort_lowering_is_bit_exact(xdt, masked):
    rng = np.random.default_rng(4)
    table = exp_table(0.05)
    inputs = [("x", ir.DataType.from_numpy(np.dtype(xdt)))] + ([("keep", ir.DataType.BOOL)] if masked else [])
    sess = _lowered_session("IntSoftmax", inputs, [table], {}, 1)
    lo, hi = np.iinfo(xdt).min, np.iinfo(xdt).max
    x = rng.integers(lo, hi + 1, (2, 4, 9, 40)).astype(xdt)
    feed = {"x": x}
    keep = None
    if masked:
        keep = rng.random((2, 1, 1, 40)) < 0.7
        keep[..., 0] = True
        keep[1, ..., :] = False  # a fully masked row: y = 0
        feed["keep"] = keep
    got = sess.run(None, feed)[0]
    want = int_softmax_reference(x, table, keep)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    if masked:
        assert np.all(got[1] == 0)
