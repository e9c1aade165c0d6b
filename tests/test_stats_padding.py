"""Calibration hygiene: padded positions of a batch never enter activation statistics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from lowbit.ir.analysis import find_linears
from lowbit.quant.stats import collect_stats


def _encoder() -> ir.Model:
    """input_ids → embedding → (masked) MatMul: a linear whose input at padded positions is not zero."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "lin.weight")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "lin.weight"], ["y"], name="lin"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
             helper.make_node("Mul", ["y", "m3"], ["out"])]
    g = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
                                         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "t", 4])],
                          [emb, w, numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def test_padded_rows_do_not_enter_statistics():
    model = _encoder()
    x = find_linears(model.graph)[0].input
    a, b = [3, 5, 7], [4, 9, 2, 11, 6, 8]
    padded = {"input_ids": np.array([a + [0, 0, 0], b], np.int64),
              "attention_mask": np.array([[1] * 3 + [0] * 3, [1] * 6], np.int64)}
    alone = [{"input_ids": np.array([s], np.int64), "attention_mask": np.ones((1, len(s)), np.int64)} for s in (a, b)]
    st_pad = collect_stats(model, [x], [padded], hessian=True, progress=False)[x]
    st_one = collect_stats(model, [x], alone, hessian=True, progress=False)[x]
    emb = model.graph.initializers["emb"].const_value.numpy().astype(np.float64)
    rows = emb[a + b]  # the reference: only the real tokens' embeddings
    np.testing.assert_allclose(st_pad.xtx, rows.T @ rows, rtol=1e-6)
    np.testing.assert_allclose(st_pad.xtx, st_one.xtx, rtol=1e-6)
    np.testing.assert_array_equal(st_pad.cmax, rows.max(axis=0).astype(np.float32))
    assert st_pad.count == 9


def test_padded_rows_of_a_flattened_activation_do_not_enter_statistics():
    """GPT-2's Conv1D form: the linear reads x reshaped to [b·t, C]; the mask [b, t] still selects its rows."""
    model = _encoder()
    proto = ir.serde.serialize_model(model)
    proto.graph.initializer.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "flat"))
    nodes = list(proto.graph.node)
    nodes.insert(1, helper.make_node("Reshape", ["x", "flat"], ["x2d"], name="flatten"))
    nodes[2].input[0] = "x2d"  # lin reads [b·t, 8]
    nodes[2].output[0] = "y2d"
    nodes.insert(3, helper.make_node("Reshape", ["y2d", "shape_out"], ["y"], name="unflatten"))
    nodes.insert(3, helper.make_node("Shape", ["x"], ["xs"]))
    nodes.insert(4, helper.make_node("Slice", ["xs", "s0", "s2"], ["bt"]))
    nodes.insert(5, helper.make_node("Concat", ["bt", "four"], ["shape_out"], axis=0))
    proto.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "s0"),
                                    numpy_helper.from_array(np.array([2], np.int64), "s2"),
                                    numpy_helper.from_array(np.array([4], np.int64), "four")])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    model = ir.serde.deserialize_model(proto)
    x = find_linears(model.graph)[0].input
    assert x.name == "x2d"
    a, b = [3, 5, 7], [4, 9, 2, 11, 6, 8]
    padded = {"input_ids": np.array([a + [0, 0, 0], b], np.int64),
              "attention_mask": np.array([[1] * 3 + [0] * 3, [1] * 6], np.int64)}
    st = collect_stats(model, [x], [padded], hessian=True, progress=False)[x]
    rows = model.graph.initializers["emb"].const_value.numpy().astype(np.float64)[a + b]
    np.testing.assert_allclose(st.xtx, rows.T @ rows, rtol=1e-6)
    assert st.count == 9


def test_token_keep_filters_per_token_activations_only():
    """The mask [b, t] selects the rows of an activation laid out per token — [b, t, c] or flattened [b·t, c] —
    and nothing else: a [b, t, h, d] tensor (heads split) has b·t·h rows, which no [b, t] mask can index."""
    from lowbit.quant.stats import token_keep

    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    want = np.array([True, True, False, True, False, False])
    for shape in ((2, 3, 4), (6, 4)):
        np.testing.assert_array_equal(token_keep({"attention_mask": mask}, np.zeros(shape, np.float32)), want)
    assert token_keep({"attention_mask": mask}, np.zeros((2, 3, 2, 4), np.float32)) is None
    assert token_keep({}, np.zeros((2, 3, 4), np.float32)) is None
