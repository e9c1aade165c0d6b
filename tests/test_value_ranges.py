"""value_ranges.absmax: one finite abs-max per value over sample inputs, constants included."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.ir.value_ranges import absmax
from lowbit.ops.registry import DOMAIN


def test_a_constant_addend_beside_a_lowbit_op_has_its_own_range():
    """A fixed-shape export folds the position-embedding lookup into an initializer that a residual Add reads;
    its range is that of the constant (was a KeyError when the graph held a lowbit op, run on a lowered copy)."""
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 4)).astype(np.float32) * 3
    table = (np.arange(256) * 0.25 - 40).astype(np.float32)  # y = table[x] for uint8 codes x
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Lookup", ["x", "table"], ["y"], domain=DOMAIN),
         onnx.helper.make_node("Add", ["y", "pos"], ["z"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [2, 4])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(pos, "pos"), onnx.numpy_helper.from_array(table, "table")])
    proto = onnx.helper.make_model(graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                                        onnx.helper.make_opsetid(DOMAIN, 1)])
    model = ir.serde.deserialize_model(proto)
    feeds = [{"x": rng.integers(0, 256, (2, 4)).astype(np.uint8)} for _ in range(3)]
    values = {v.name: v for n in model.graph for v in (*n.inputs, *n.outputs)}
    got = absmax(model, [values["pos"], values["y"], values["z"]], feeds)
    ys = [f["x"].astype(np.float64) * 0.25 - 40 for f in feeds]
    np.testing.assert_allclose(got["pos"], np.abs(pos).max(), rtol=0)
    np.testing.assert_allclose(got["y"], max(np.abs(y).max() for y in ys), rtol=1e-6)
    np.testing.assert_allclose(got["z"], max(np.abs(y + pos).max() for y in ys), rtol=1e-6)
    assert [n.op_type for n in model.graph] == ["Lookup", "Add"] and len(model.graph.outputs) == 1
