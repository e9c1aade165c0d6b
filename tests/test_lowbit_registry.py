"""The one ``lowbit`` op registry: every op has a schema the checker accepts, a numpy reference the
reference interpreter runs, and a plain-ONNX form (function body or lowering) that ORT runs to the
same values (bit for bit for integer ops)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from lowbit.backends.lower_lowbit import LowerLowbit
from lowbit.errors import PassFailure
from lowbit.ops.integer_nonlinear import exp_table
from lowbit.ops.registry import DOMAIN, OPS, VERSION, attach_functions, lowbit_op, register_schemas
from lowbit.ops.float_ops import pack3
from lowbit.ops.integer_ops import dyadic
from lowbit.runtime.reference import ReferenceInterpreter
from lowbit.ir.sessions import make_session

ALL_OPS = ("MatMul3Bit", "Hadamard", "Requantize", "Lookup", "IntNorm", "IntSoftmax", "MatMulGrid")


def _case(op_type: str):
    """(feeds, initializers, attributes) of a tiny instance of ``op_type``; the node reads them in this order."""
    rng = np.random.default_rng(len(op_type))
    if op_type == "MatMul3Bit":
        k, n, block = 40, 6, 32  # two groups, the last one partial
        return ({"x": rng.standard_normal((2, 3, k)).astype(np.float32)},
                {"B": pack3(rng.integers(0, 8, (n, k)).astype(np.uint8)),
                 "s": (rng.random((n, 2)) + 0.1).astype(np.float32), "z": rng.integers(0, 8, (n, 2)).astype(np.uint8)},
                {"block_size": block})
    if op_type == "MatMulGrid":
        import ml_dtypes

        from lowbit.ops.grid_ops import pack_codes

        k, n, g, bits = 40, 5, 16, 3  # three groups, K padded to 48; 240 codes = 30 words of 3 bytes
        return ({"x": rng.standard_normal((2, 3, k)).astype(np.float32)},
                {"codes": pack_codes(rng.integers(0, 8, (3, g, n)), bits),
                 "types": rng.integers(0, 4, (3, 1, n)).astype(ml_dtypes.uint2),
                 "s": (rng.random((3, 1, n)) + 0.1).astype(np.float32),
                 "grid": rng.standard_normal(32).astype(np.float32)}, {"bits": bits, "group": g})
    if op_type == "Hadamard":
        q = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
        return {"x": rng.standard_normal((2, 12)).astype(np.float32)}, {"Q": q}, {}  # n = 12 = 4·3
    if op_type == "Requantize":
        b, c, _ = dyadic(rng.uniform(1e-5, 0.05, 8))
        acc = rng.integers(-2 ** 20, 2 ** 20, (5, 8)).astype(np.int32)
        return {"acc": acc}, {"b": b, "c": c, "zp": np.asarray(-3, np.int8)}, {}
    if op_type == "Lookup":
        x = rng.integers(-128, 128, (5, 8)).astype(np.int8)
        return {"x": x}, {"table": rng.integers(-128, 128, (8, 256)).astype(np.int8)}, {}
    if op_type == "IntNorm":
        x = rng.integers(-3000, 3000, (5, 8)).astype(np.int16)
        return ({"x": x}, {"zx": np.asarray(2, np.int16), "g": rng.integers(-900, 900, 8).astype(np.int64),
                           "bias": rng.integers(-2 ** 20, 2 ** 20, 8).astype(np.int64), "zp": np.asarray(3, np.uint8)},
                {"rms": 0, "frac_bits": 20, "shift": 24, "n_min": 4})
    if op_type == "IntSoftmax":
        keep = rng.random((1, 8)) < 0.7
        keep[0, 0] = True
        return ({"x": rng.integers(-128, 128, (5, 8)).astype(np.int8)},
                {"table": exp_table(0.06), "keep": keep}, {})
    raise AssertionError(op_type)


def _model(op_type: str) -> tuple[ir.Model, dict[str, np.ndarray]]:
    feeds, inits, attrs = _case(op_type)
    node = helper.make_node(op_type, [*feeds, *inits], ["y"], domain=DOMAIN, name=op_type.lower(), **attrs)
    out = OPS[op_type].reference(*feeds.values(), *inits.values(), **attrs)
    graph = helper.make_graph(
        [node], "t", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in feeds.items()],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(out.dtype), out.shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opset = 25 if op_type == "MatMulGrid" else 21  # UINT2 codes
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)])
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto), feeds


def test_registry_holds_all_four_ops_each_with_reference_and_plain_onnx_form():
    assert set(OPS) == set(ALL_OPS)
    for name, op in OPS.items():
        assert op.name == name and callable(op.reference) and 1 <= op.version <= VERSION
        assert op.function is not None or op.lower is not None
        assert op.inputs and op.outputs and op.doc
    assert {n for n, op in OPS.items() if op.function is not None} == {"MatMul3Bit", "Hadamard", "MatMulGrid"}
    assert {n for n, op in OPS.items() if op.lower is not None} == {"Requantize", "Lookup", "IntNorm", "IntSoftmax"}


@pytest.mark.parametrize("op_type", ALL_OPS)
def test_checker_accepts_op_after_attach_functions_and_register_schemas(op_type):
    model, _ = _model(op_type)
    attach_functions(model)
    has_body = OPS[op_type].function is not None
    assert {f.name for f in model.functions.values()} == ({op_type} if has_body else set())
    register_schemas()
    assert onnx.defs.has(op_type, DOMAIN)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    bad = ir.serde.serialize_model(model)
    bad.graph.node[0].input.append(bad.graph.node[0].input[0])  # one input too many: the schema must refuse it
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(bad)


@pytest.mark.parametrize("op_type", ALL_OPS)
def test_reference_interpreter_runs_op_and_matches_ort(op_type):
    model, feeds = _model(op_type)
    node = model.graph.node(0)
    assert ReferenceInterpreter.supports(node)
    want = ReferenceInterpreter(model).run([node], feeds)["y"]
    op = OPS[op_type]
    if op.function is not None:
        attach_functions(model)
        got = make_session(model, optimize=False).run(None, feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:
        LowerLowbit()(model)
        assert all(n.domain != DOMAIN for n in model.graph) and DOMAIN not in model.opset_imports
        got = make_session(model).run(None, feeds)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_lower_lowbit_refuses_an_op_without_lowering():
    model, _ = _model("Hadamard")
    with pytest.raises(PassFailure, match="no lowering for lowbit.Hadamard"):
        LowerLowbit()(model)


def test_registration_contract():
    with pytest.raises(ValueError, match="function body or a lowering"):
        lowbit_op("Nothing", doc="-", inputs=[("x", "T")], outputs=[("y", "T")], types={"T": ["tensor(float)"]})
    with pytest.raises(ValueError, match="registered twice"):
        lowbit_op("Lookup", doc="-", inputs=[("x", "T")], outputs=[("y", "T")], types={"T": ["tensor(float)"]},
                  lower=OPS["Lookup"].lower)(OPS["Lookup"].reference)
    assert set(OPS) == set(ALL_OPS)


def test_registered_schema_accepts_an_optional_input_left_out_and_still_checks_the_rest():
    """IntSoftmax's ``keep`` is optional (integer-attention leaves it out when there is no mask): the checker,
    once it knows lowbit's schemas, must accept the two-input node and still refuse a one-input one."""
    register_schemas()

    def model(inputs):
        node = helper.make_node("IntSoftmax", inputs, ["y"], domain=DOMAIN)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [2, 4])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [2, 4])],
                                  [numpy_helper.from_array(exp_table(0.1), "table")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, VERSION)])

    onnx.checker.check_model(model(["x", "table"]))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model(["x"]))
