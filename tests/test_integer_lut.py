"""integer-lut on lowbit's own integer-only chain: LN → linear → Gelu → linear after
``calibrate,migrate-steps,dyadic``.  The Gelu between a dequantizer and migrate-steps' round-and-clip
quantizer becomes one ``lowbit.Lookup`` whose 256 entries are written here from the formula
(``sat(round(gelu((c − z)·s) / t) + u)``), and the graph's outputs stay those of the float Gelu path.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.analysis import const_array
from lowbit.passmanager.manager import CompileContext, PassManager
from onnx_text import ort_outputs, parse

C, H, N = 16, 24, 8


def _lit(a):
    return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))


@pytest.fixture(scope="module")
def chain():
    rng = np.random.default_rng(5)
    gamma, beta = (0.5 + rng.random(C)).astype(np.float32), (0.2 * rng.standard_normal(C)).astype(np.float32)
    w1 = (rng.standard_normal((C, H)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((H, N)) * 0.3).astype(np.float32)
    text = f"""
    g (float[b, t, {C}] x) => (float[b, t, {N}] y)
    <float[{C}] gamma = {{{_lit(gamma)}}}, float[{C}] beta = {{{_lit(beta)}}}, float[{C}, {H}] w1 = {{{_lit(w1)}}},
     float[{H}, {N}] w2 = {{{_lit(w2)}}}>
    {{
        h = LayerNormalization <axis = -1> (x, gamma, beta)
        a = MatMul (h, w1)
        f = Gelu (a)
        y = MatMul (f, w2)
    }}"""
    feeds = [{"x": rng.standard_normal((1, 24, C)).astype(np.float32)} for _ in range(4)]
    ctx = CompileContext(calibration=feeds, probes=feeds[:1], show_progress=False)
    before = PassManager.from_pipeline("calibrate{rows=256},migrate-steps,dyadic", ctx).run(parse(text))
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(before))
    pm = PassManager.from_pipeline("integer-lut", ctx)
    after = pm.run(copy)
    return before, after, feeds, pm.passes[0].stats


def test_gelu_becomes_one_lookup(chain):
    before, after, _, stats = chain
    ops_b, ops_a = [n.op_type for n in before.graph], [n.op_type for n in after.graph]
    assert "Gelu" in ops_b and "Gelu" not in ops_a and ops_a.count("Lookup") == 1 and stats["Gelu"] == 1


def test_table_follows_the_formula(chain):
    before, after, _, _ = chain
    look = next(n for n in after.graph if n.op_type == "Lookup")
    table = const_array(look.inputs[1]).astype(np.int64)
    gelu = next(n for n in before.graph if n.op_type == "Gelu")
    dq = gelu.inputs[0].producer()
    s, z = float(const_array(dq.inputs[1])), int(const_array(dq.inputs[2]))
    mul = next(u.node for u in gelu.outputs[0].uses())
    inv_t = const_array(mul.inputs[1]).astype(np.float64).reshape(-1)  # migrate-steps: x · (1/t)
    add = next(n for n in before.graph if n.op_type == "Add" and n.inputs[0].producer() is not None
               and n.inputs[0].producer().op_type == "Round" and n.inputs[0].producer().inputs[0] is mul.outputs[0])
    u = const_array(add.inputs[1]).astype(np.float64).reshape(-1)
    codes = np.arange(256)
    x = ((codes - z) * s).astype(np.float32).astype(np.float64)
    g = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    want = np.clip(np.rint(g[None, :] * inv_t[:, None]) + u[:, None], 0, 255)
    want = want[0] if table.ndim == 1 else want
    assert np.mean(np.abs(table - want) <= 1) == 1.0 and np.mean(table == want) > 0.98


def test_outputs_stay_those_of_the_float_gelu_path(chain):
    before, after, feeds, _ = chain
    before, after = (PassManager.from_pipeline("lower-lowbit", CompileContext(show_progress=False)).run(
        ir.serde.deserialize_model(ir.serde.serialize_model(m))) for m in (before, after))
    for f in feeds:
        a, b = ort_outputs(after, f)[0], ort_outputs(before, f)[0]
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def test_static_quantizer_of_an_all_zero_activation_has_a_finite_step():
    text = """
    g (float[b, 4] x) => (float[b, 3] y)
    <float[4] zero = {0.0, 0.0, 0.0, 0.0},
     float[4, 3] w = {1.0, -2.0, 0.5, 0.25, 1.0, -1.0, 3.0, 0.0, 2.0, -0.5, 1.5, 1.0}>
    { h = Mul (x, zero)
      y = MatMul (h, w) }"""
    feeds = [{"x": np.ones((2, 4), np.float32)}]
    ctx = CompileContext(calibration=feeds, probes=feeds, show_progress=False)
    model = PassManager.from_pipeline("calibrate,quantize{mode=static}", ctx).run(parse(text))
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    step = float(const_array(q.inputs[1]))
    assert np.isfinite(step) and step > 0
    np.testing.assert_array_equal(ort_outputs(model, feeds[0])[0], np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("out_type, u", [("uint8", 128), ("int8", -3)])
def test_a_qdq_sigmoid_becomes_a_lookup_of_the_formula(out_type, u):
    """The QDQ form (``DequantizeLinear → Sigmoid → QuantizeLinear``, as ``quantize`` writes it), not migrate-steps'
    round-and-clip: the table is ``sat(round(σ((c − z)·s) / t) + u)`` over all 256 input codes, clipped to the
    output type's range (uint8 0..255, int8 −128..127), and the lowered graph maps every code through it."""
    s, z, t = 0.05, 120, 1.0 / 250
    model = parse(f"""
    g (uint8[n] x) => ({out_type}[n] y)
    <float s = {{{s}}}, uint8 z = {{{z}}}, float t = {{{t:.9g}}}, {out_type} u = {{{u}}}>
    {{
        d = DequantizeLinear (x, s, z)
        f = Sigmoid (d)
        y = QuantizeLinear (f, t, u)
    }}""")
    pm = PassManager.from_pipeline("integer-lut", CompileContext(show_progress=False, properties={"quantized"}))
    out = pm.run(model)
    assert [n.op_type for n in out.graph] == ["Lookup"]
    codes = np.arange(256)
    x = ((codes - z) * np.float32(s)).astype(np.float32).astype(np.float64)
    lo, hi = (0, 255) if out_type == "uint8" else (-128, 127)
    want = np.clip(np.rint(1 / (1 + np.exp(-x)) / np.float32(t)) + u, lo, hi)
    table = const_array(next(iter(out.graph)).inputs[1]).astype(np.int64).reshape(-1)
    assert np.abs(table - want).max() <= 1 and np.mean(table == want) > 0.98
    lowered = PassManager.from_pipeline("lower-lowbit", CompileContext(show_progress=False)).run(out)
    got = ort_outputs(lowered, {"x": codes.astype(np.uint8)})[0]
    assert got.dtype == np.dtype(out_type) and np.array_equal(got.astype(np.int64), table)
