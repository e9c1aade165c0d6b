"""TVM lowering of the grid form (``lowbit.MatMulGrid``, :mod:`lowbit.quant.mod_graph`): the weight is folded.

``MatMulGrid(X, codes, types, scales, grid)`` with constant operands becomes ``MatMul(X, W)`` with the float32
weight ``W = reshape(grid[types·2^b + c]·scales, [G·g, N])[:K]`` its function body computes
(:func:`lowbit.ops.grid_ops.matmul_grid_reference`'s formula, same float32 operations).  ``scales`` may be an
initializer or the constant ``Cast`` (float16/uint8 storage) and ``Mul`` (uint8 codes × step) chain that
``quantize-weights{scale_dtype=...}`` writes; that chain is evaluated here and removed.  The TVM module then
holds float weights (4 bytes a weight): correct, not fast; the low-bit grid kernel is
``backends/kernels/lowbit_grid.c`` (lowbit-cpu), not yet called from TVM.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.ir.rewrite import replace_value

__all__ = ["fold_matmul_grid"]

logger = logging.getLogger(__name__)


def _eval(value: ir.Value, node: ir.Node, dead: list[ir.Node]) -> np.ndarray:
    """A constant operand: an initializer, or Cast/Mul of constants (collected in ``dead``)."""
    if value.const_value is not None:
        arr = value.const_value.numpy()
        return arr.astype(np.uint8) if value.const_value.dtype == ir.DataType.UINT2 else arr
    prod = value.producer()
    if prod is not None and (prod.domain or "") in ("", "ai.onnx") and prod.op_type in ("Cast", "Mul"):
        args = [_eval(v, node, dead) for v in prod.inputs]
        dead.append(prod)
        if prod.op_type == "Mul":
            return np.multiply(*args)
        to = ir.DataType(prod.attributes["to"].as_int())
        return args[0].astype(to.numpy())
    raise LowbitError(f"node '{node.name}' (MatMulGrid): input '{value.name}' must be constant for the TVM backend",
                      hint="only constant grid-form weights are supported")


def fold_matmul_grid(graph: ir.Graph, node: ir.Node) -> None:
    """Replace ``node`` by ``MatMul(X, W)`` (see the module doc)."""
    from lowbit.ops.grid_ops import unpack_codes

    bits, group = node.attributes["bits"].as_int(), node.attributes["group"].as_int()
    dead: list[ir.Node] = []
    codes, types, scales, grid = (_eval(v, node, dead) for v in node.inputs[1:5])
    k = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
    if not isinstance(k, int):
        raise LowbitError(f"node '{node.name}' (MatMulGrid): the input's last dimension must be static for TVM")
    nb, n = scales.shape[0], scales.shape[-1]
    c = unpack_codes(codes, bits, nb * group * n).reshape(nb, group, n)
    idx = np.asarray(types).astype(np.int64) * (1 << bits) + c
    w = (np.asarray(grid, np.float32)[idx] * np.asarray(scales, np.float32)).reshape(-1, n)[:k]
    wv = ir.Value(name=f"{node.name}.folded_weight", const_value=ir.tensor(np.ascontiguousarray(w, np.float32)))
    wv.shape, wv.type = ir.Shape(w.shape), ir.TensorType(ir.DataType.FLOAT)
    graph.register_initializer(wv)
    mm = ir.node("MatMul", [node.inputs[0], wv], name=f"{node.name}.matmul")
    graph.insert_before(node, mm)
    out = node.outputs[0]
    mm.outputs[0].shape, mm.outputs[0].type = out.shape, out.type
    replace_value(graph, out, mm.outputs[0])
    graph.remove(node, safe=True)
    for prod in reversed(dead):  # the scale chain, once nothing else reads it
        if prod.graph is graph and not any(o.uses() for o in prod.outputs) and not any(
                o in graph.outputs for o in prod.outputs):
            graph.remove(prod, safe=True)
    logger.debug("MatMulGrid %s folded to a float [%d, %d] weight", node.name, *w.shape)
