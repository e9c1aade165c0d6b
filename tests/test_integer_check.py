"""Integer-region checker and reference interpreter on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.integer_check import check_integer_regions
from lowbit.ir.rewrite import add_initializer, make_node
from lowbit.runtime.reference import ReferenceInterpreter, UnsupportedReferenceOp, compare_regions_with_ort


def _two_linears(float_rescale: bool) -> ir.Model:
    """x → Q → MatMulInteger → (float rescale | lowbit.Requantize) → MatMulInteger → DQ(int32)."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["m", 16]))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21, "lowbit": 1}, name="g")

    def node(op, ins, name, domain="", **attrs):
        return make_node(g, op, ins, origin="test", name=name, domain=domain, attributes=attrs).outputs[0]

    def const(name, arr):
        return add_initializer(g, name, np.asarray(arr))

    q = node("QuantizeLinear", [x, const("s", np.float32(0.05)), const("z", np.uint8(128))], "q")
    acc = node("MatMulInteger", [q, const("w1", rng.integers(-127, 128, (16, 8)).astype(np.int8))], "mm1")
    if float_rescale:
        f = node("Cast", [acc], "to_float", to=ir.DataType.FLOAT)
        f = node("Mul", [f, const("m", np.float32(0.01))], "rescale")
        h = node("QuantizeLinear", [f, const("s2", np.float32(1.0)), const("z2", np.uint8(128))], "q2")
    else:
        h = node("Requantize", [acc, const("b", np.int64(5 << 26)), const("c", np.int64(39)),
                                const("z2", np.uint8(128))], "rq", domain="lowbit")
    acc2 = node("MatMulInteger", [h, const("w2", rng.integers(-127, 128, (8, 4)).astype(np.int8))], "mm2")
    g.outputs.append(node("DequantizeLinear", [acc2, const("s3", np.float32(1e-3))], "dq"))
    return ir.Model(g, ir_version=10)


def test_float_rescale_between_integer_tensors_is_reported():
    rep = check_integer_regions(_two_linears(float_rescale=True))
    assert len(rep.regions) == 2 and len(rep.float_rescales) == 1
    assert set(rep.float_rescales[0]["ops"]) == {"Cast", "Mul"}


def test_dyadic_chain_is_one_integer_region():
    rep = check_integer_regions(_two_linears(float_rescale=False))
    assert len(rep.regions) == 1 and not rep.float_rescales
    region = rep.regions[0]
    assert region.ops == {"MatMulInteger": 2, "lowbit.Requantize": 1}
    assert [e.op_type for e in region.entries] == ["QuantizeLinear"]
    assert [e.op_type for e in region.exits] == ["DequantizeLinear"]


def test_reference_matches_ort_on_lowered_chain():
    from lowbit.backends.lower_lowbit import LowerLowbit

    model = _two_linears(float_rescale=False)
    LowerLowbit()(model)
    feeds = [{"x": np.random.default_rng(i).normal(0, 3, (5, 16)).astype(np.float32)} for i in range(4)]
    compared, mismatches = compare_regions_with_ort(model, feeds)
    assert compared > 20 and mismatches == []


def test_reference_integer_semantics():
    interp = ReferenceInterpreter(_two_linears(False))
    cast = ir.Node("", "Cast", [ir.Value(name="a")], attributes=[ir.AttrInt64("to", ir.DataType.INT8)])
    assert interp.run_node(cast, [np.array([200, -129, 127], np.int32)])[0].tolist() == [-56, 127, 127]
    shift = ir.Node("", "BitShift", [ir.Value(name="a"), ir.Value(name="b")],
                    attributes=[ir.AttrString("direction", "RIGHT")])
    with pytest.raises(UnsupportedReferenceOp):
        interp.run_node(shift, [np.array([-8], np.int64), np.array([1], np.int64)])
    div = ir.Node("", "Div", [ir.Value(name="a"), ir.Value(name="b")])
    assert interp.run_node(div, [np.array([-7, 7], np.int32), np.array([2, -2], np.int32)])[0].tolist() == [-3, -3]
    add = ir.Node("", "Add", [ir.Value(name="a"), ir.Value(name="b")])
    assert interp.run_node(add, [np.array([2 ** 31 - 1], np.int32), np.array([1], np.int32)])[0][0] == -2 ** 31


def test_integer_shares_of_ops_and_gemm_macs():
    """x → float MatMul (16×8) → Q → MatMulInteger (8×4) → DQ: 32 of 160 weight MACs and 1 of 4 ops integer."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["m", 16]))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    h = make_node(g, "MatMul", [x, add_initializer(g, "w1", rng.standard_normal((16, 8)).astype(np.float32))],
                  origin="test", name="mm_f").outputs[0]
    q = make_node(g, "QuantizeLinear", [h, add_initializer(g, "s", np.float32(0.1)),
                                        add_initializer(g, "z", np.uint8(128))], origin="test", name="q").outputs[0]
    acc = make_node(g, "MatMulInteger", [q, add_initializer(g, "w2", rng.integers(-127, 128, (8, 4)).astype(np.int8))],
                    origin="test", name="mm_i").outputs[0]
    g.outputs.append(make_node(g, "DequantizeLinear", [acc, add_initializer(g, "s2", np.float32(1e-3))],
                               origin="test", name="dq").outputs[0])
    rep = check_integer_regions(ir.Model(g, ir_version=10))
    assert rep.gemm_macs == {"float": 128, "integer": 32} and rep.integer_mac_share == pytest.approx(0.2)
    assert rep.integer_ops == 1 and rep.integer_op_share == pytest.approx(0.25)
    assert rep.summary()["integer_mac_share"] == 0.2
