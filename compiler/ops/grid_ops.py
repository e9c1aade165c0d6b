"""``lowbit.MatMulGrid``: a matmul whose weight is stored as per-group grid codes (mixture of data types).

``MatMulGrid(X[..., K], codes [G, g, N] uint2|uint4, types [G, 1, N] uint2, scales [G, 1, N] float,
grid [T·L] float; levels=L) → Y[..., N]``::

    W[G, g, N] = grid[types · L + codes] · scales,   W ← reshape(W, [G·g, N])[:K],   Y = X·W

i.e. each (group, column) reads its ``L = 2^b`` levels from row ``types`` of the grid table (K is padded
to whole groups; the padding rows are dropped).  This is the storage form of
``quantize-weights{dtype=mod}`` (:mod:`lowbit.quant.mod`).  The function body dequantizes with standard
ops (DequantizeLinear of the unsigned codes, Gather from the table), so any ONNX runtime at opset ≥ 25
(UINT2) runs it; on constant inputs ONNX Runtime folds the weight once at session creation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowbit.ops.registry import DOMAIN, lowbit_op

__all__ = ["matmul_grid_reference"]


def _matmul_grid_function(opset: int = 25) -> onnx.FunctionProto:
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr))  # noqa: E731
    lv = helper.make_node("Constant", [], ["lv0"])
    lv.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name="levels"))
    nodes = [
        c("c_one", np.array(1.0, np.float32)), c("c_zero", np.array([0], np.int64)),
        c("c_m1", np.array([-1], np.int64)), lv,
        helper.make_node("Cast", ["lv0"], ["lv"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["codes", "c_one"], ["qf"]),
        helper.make_node("DequantizeLinear", ["types", "c_one"], ["tf0"]),
        helper.make_node("Mul", ["tf0", "lv"], ["tf"]),
        helper.make_node("Add", ["qf", "tf"], ["idx_f"]),
        helper.make_node("Cast", ["idx_f"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["grid", "idx"], ["levels_v"]),
        helper.make_node("Mul", ["levels_v", "scales"], ["w3"]),
        helper.make_node("Shape", ["scales"], ["n"], start=-1),
        helper.make_node("Concat", ["c_m1", "n"], ["shape2"], axis=0),
        helper.make_node("Reshape", ["w3", "shape2"], ["w2"]),
        helper.make_node("Shape", ["X"], ["k"], start=-1),
        helper.make_node("Slice", ["w2", "c_zero", "k", "c_zero"], ["W"]),
        helper.make_node("MatMul", ["X", "W"], ["Y"]),
    ]
    return helper.make_function(DOMAIN, "MatMulGrid", ["X", "codes", "types", "scales", "grid"], ["Y"], nodes,
                                [helper.make_opsetid("", max(opset, 25))], attributes=["levels"])


@lowbit_op("MatMulGrid", doc="Y = X·W, W = reshape(grid[types·levels + codes]·scales, [G·g, N])[:K]: per-group "
           "grid codes (mixture of data types), K padded to whole groups.",
           inputs=[("X", "T"), ("codes", "C"), ("types", "tensor(uint2)"), ("scales", "T"), ("grid", "T")],
           outputs=[("Y", "T")], attributes=["levels"],
           types={"T": ["tensor(float)"], "C": ["tensor(uint2)", "tensor(uint4)"]}, function=_matmul_grid_function)
def matmul_grid_reference(x, codes, types, scales, grid, levels: int) -> np.ndarray:
    k, n = x.shape[-1], scales.shape[-1]
    idx = np.asarray(types).astype(np.int64) * levels + np.asarray(codes).astype(np.int64)
    w = (np.asarray(grid, np.float32)[idx] * np.asarray(scales, np.float32)).reshape(-1, n)[:k]
    return (x.astype(np.float32) @ w).astype(np.float32)
