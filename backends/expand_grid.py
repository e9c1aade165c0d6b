"""``expand-grid``: rewrite each ``lowbit.MatMulGrid`` into a float ``MatMul`` (a load-time fast path).

On disk a grid-form layer (:mod:`lowbit.quant.mod_graph`) holds 2/3-bit codes, 2-bit grid indices and small
scales.  ONNX Runtime has no kernel for it, and the op's function body unpacks the whole weight on every call
(a 1024x1024 layer, one row: 27.8 ms a call against 0.06 ms folded, best of 10 on the 2-core machine).  Folding the
constant operands gives the float32 weight ``W = reshape(grid[types·2^b + c]·scales, [G·g, N])[:K]`` — the
function body's own float32 operations, so results equal it up to summation order — and ORT runs a float
MatMul: 4 bytes a weight in memory; the file stays in grid form.  ``scales`` may be an initializer or the
constant ``Cast``/``Mul`` chain of uint8/float16 storage (evaluated and removed).  Run by
:func:`lowbit.runtime.fastpath.fast_session` on an in-memory copy, and by the TVM backend's preparation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.ir.rewrite import replace_value
from lowbit.ops.registry import DOMAIN
from lowbit.passmanager.manager import Pass, PassResult, register_pass

__all__ = ["ExpandGrid", "expand_grid", "fold_matmul_grid"]

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
        return args[0].astype(ir.DataType(prod.attributes["to"].as_int()).numpy())
    raise LowbitError(f"node '{node.name}' (MatMulGrid): input '{value.name}' is not constant",
                      hint="only constant grid-form weights can be expanded")


def fold_matmul_grid(graph: ir.Graph, node: ir.Node) -> None:
    """Replace ``node`` by ``MatMul(X, W)`` (see the module doc)."""
    from lowbit.ops.grid_ops import unpack_codes

    bits, group = node.attributes["bits"].as_int(), node.attributes["group"].as_int()
    dead: list[ir.Node] = []
    codes, types, scales, grid = (_eval(v, node, dead) for v in node.inputs[1:5])
    nb, n = scales.shape[0], scales.shape[-1]
    k = node.inputs[0].shape[-1] if node.inputs[0].shape is not None else None
    if not isinstance(k, int):  # unknown: K is the padded length (a MatMul over another K fails to build, loudly)
        k = nb * group
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


def expand_grid(model: ir.Model) -> int:
    """Fold every ``lowbit.MatMulGrid`` of ``model`` in place; returns the count."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type == "MatMulGrid" and node.domain == DOMAIN:
            fold_matmul_grid(graph, node)
            count += 1
    if count:
        for v in list(graph.initializers.values()):
            if not list(v.uses()) and v not in graph.outputs:
                del graph.initializers[v.name]
    return count


@register_pass("expand-grid")
class ExpandGrid(Pass):
    """Run grid-form layers as float MatMuls (see the module doc)."""

    @dataclass(frozen=True)
    class Options:
        pass

    def call(self, model):
        count = expand_grid(model)
        self.stats["layers"] = count
        return PassResult(model, modified=count > 0)
