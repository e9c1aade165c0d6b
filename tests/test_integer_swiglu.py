"""integer-swiglu on a hand-built SwiGLU product: integer codes vs the float formula, reference == ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.integer_check import check_integer_regions
from lowbit.ir.rewrite import add_initializer, make_node
from lowbit.passmanager.manager import QUANTIZED, CompileContext, PassManager
from lowbit.runtime.reference import ReferenceInterpreter, compare_graph_with_ort

S_G, Z_G, S_U, Z_U = 0.05, 120, 0.03, 131


def _graph(steps: np.ndarray, zps: np.ndarray, gate_op: str = "Sigmoid", gate_of: str = "gate") -> ir.Model:
    """gate/up codes → DQ → silu(G)·U → migrate-steps' round-and-clip (x/t, round, +z, clip, uint8)."""
    g_in = ir.Value(name="g", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(["m", 8]))
    u_in = ir.Value(name="u", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(["m", 8]))
    g = ir.Graph([g_in, u_in], [], nodes=[], opset_imports={"": 21}, name="g")

    def node(op, ins, name, **attrs):
        return make_node(g, op, ins, origin="test", name=name, attributes=attrs).outputs[0]

    def const(name, arr):
        return add_initializer(g, name, np.asarray(arr))

    gate = node("DequantizeLinear", [g_in, const("sg", np.float32(S_G)), const("zg", np.uint8(Z_G))], "gate")
    up = node("DequantizeLinear", [u_in, const("su", np.float32(S_U)), const("zu", np.uint8(Z_U))], "up")
    silu = node("Mul", [gate, node(gate_op, [gate if gate_of == "gate" else up], "sig")], "silu")
    x = node("Mul", [silu, up], "gated")
    x = node("Mul", [x, const("inv_t", (1 / steps).astype(np.float32))], "act_scale")
    r = node("Add", [node("Round", [x], "round"), const("zf", zps.astype(np.float32))], "offset")
    c = node("Clip", [r, const("lo", np.float32(0)), const("hi", np.float32(255))], "clip")
    q = node("Cast", [c], "q", to=ir.DataType.UINT8)
    q.dtype = ir.DataType.UINT8
    g.outputs.append(q)
    return ir.Model(g, ir_version=10)


def test_swiglu_codes_follow_the_float_formula_and_reference_equals_ort():
    rng = np.random.default_rng(0)
    steps, zps = 2.0 ** rng.integers(-6, -3, 8), rng.integers(100, 140, 8).astype(np.uint8)
    model = _graph(steps, zps)
    ctx = CompileContext(show_progress=False, properties={QUANTIZED})
    PassManager.from_pipeline("integer-swiglu", ctx).run(model)
    assert ctx.report["integer-swiglu"] == {"swiglu": 1}
    assert set(check_integer_regions(model).float_ops) == set()  # codes in, codes out, no float op
    feeds = [{"g": rng.integers(0, 256, (50, 8)).astype(np.uint8), "u": rng.integers(0, 256, (50, 8)).astype(np.uint8)}
             for _ in range(3)]
    compared, mismatches = compare_graph_with_ort(model, feeds)
    assert compared >= 3 * 6 and mismatches == []
    for f in feeds:
        got = ReferenceInterpreter(model).run(list(model.graph), f)[model.graph.outputs[0].name]
        gf, uf = (f["g"].astype(np.float64) - Z_G) * S_G, (f["u"].astype(np.float64) - Z_U) * S_U
        want = np.clip(np.round(gf / (1 + np.exp(-gf)) * uf / steps) + zps, 0, 255)
        diff = np.abs(got.astype(np.int64) - want)
        assert diff.max() <= 1 and diff.mean() < 0.02


def _graph_up_from_accumulator(steps, zps, b, c) -> ir.Model:
    """As _graph, but the up codes are a Requantize of an int32 accumulator (dyadic's output form)."""
    model = _graph(steps, zps)
    g = model.graph
    u_in = g.inputs[1]
    acc = ir.Value(name="acc", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["m", 8]))
    g.inputs[1] = acc
    rq = make_node(g, "Requantize", [acc, add_initializer(g, "b", b), add_initializer(g, "c", c),
                                     add_initializer(g, "zr", np.uint8(Z_U))],
                   origin="test", name="up_rq", domain="lowbit")
    rq.outputs[0].dtype = ir.DataType.UINT8
    g.remove(rq, safe=False)
    g.insert_before(list(g)[0], rq)
    u_in.replace_all_uses_with(rq.outputs[0])
    model.opset_imports["lowbit"] = 1
    return model


def test_up_codes_from_an_accumulator_are_widened_to_int16():
    """The up projection's Requantize feeds only the product: integer-swiglu reads an int16 twin (step
    S_U/257).  Reference == ORT bit for bit, and the codes are closer to the float formula on the
    unrounded up value acc·b/2^c·S_U than the 8-bit up codes leave them."""
    from lowbit.ops.integer_ops import dyadic

    rng = np.random.default_rng(4)
    steps, zps = 2.0 ** rng.integers(-9, -7, 8), rng.integers(100, 140, 8).astype(np.uint8)
    b, c, _ = dyadic(np.full(8, 1 / 997.0), 30, shared_shift=True)
    feeds = [{"g": rng.integers(0, 256, (60, 8)).astype(np.uint8),
              "acc": rng.integers(-120_000, 120_000, (60, 8)).astype(np.int32)} for _ in range(3)]
    errs = {}
    for wide in (False, True):
        model = _graph_up_from_accumulator(steps, zps, b, c)
        ctx = CompileContext(show_progress=False, properties={QUANTIZED})
        PassManager.from_pipeline(f"integer-swiglu{{wide_up={str(wide).lower()}}}", ctx).run(model)
        assert ctx.report["integer-swiglu"].get("wide_up", 0) == int(wide)
        kinds = {n.outputs[0].dtype for n in model.graph if n.op_type == "Requantize" and n.name.endswith("up_wide")}
        assert kinds == ({ir.DataType.INT16} if wide else set())
        compared, mismatches = compare_graph_with_ort(model, feeds)
        assert compared >= 3 * 6 and mismatches == []
        e = []
        for f in feeds:
            got = ReferenceInterpreter(model).run(list(model.graph), f)[model.graph.outputs[0].name]
            gf = (f["g"].astype(np.float64) - Z_G) * S_G
            uf = np.clip(f["acc"] / 997.0, -Z_U, 255 - Z_U) * S_U  # the up value before any 8-bit rounding
            want = np.clip(np.round(gf / (1 + np.exp(-gf)) * uf / steps) + zps, 0, 255)
            e.append(np.abs(got.astype(np.int64) - want))
        errs[wide] = np.concatenate(e)
        if wide:  # only the silu table and the final rounding remain
            assert errs[wide].max() <= 1
    assert errs[True].mean() < 0.5 * errs[False].mean(), (errs[True].mean(), errs[False].mean())


@pytest.mark.parametrize("gate_op, gate_of", [("Tanh", "gate"), ("Sigmoid", "up")])
def test_a_gate_that_is_not_silu_is_left_alone(gate_op, gate_of):
    """Only ``G·σ(G)·U`` is SiLU-gated: ``G·tanh(G)·U`` or ``G·σ(U)·U`` (a sigmoid of the other operand) have the
    same graph shape and must not become IntSwiGLU (must not fire: the model is unchanged)."""
    from onnx_text import digest

    rng = np.random.default_rng(0)
    steps, zps = 2.0 ** rng.integers(-6, -3, 8), rng.integers(100, 140, 8).astype(np.uint8)
    model = _graph(steps, zps, gate_op, gate_of)
    want = digest(model)
    ctx = CompileContext(show_progress=False, properties={QUANTIZED})
    PassManager.from_pipeline("integer-swiglu", ctx).run(model)
    assert ctx.report.get("integer-swiglu", {}).get("swiglu", 0) == 0 and digest(model) == want
