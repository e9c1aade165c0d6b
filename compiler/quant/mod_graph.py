"""The file form of a mixture-of-data-types weight (``lowbit.quant.mod``): one ``lowbit.MatMulGrid`` node.

The file holds three initializers per weight and one grid table per bit width (shared by all layers):

* ``<name>.weight_q``     — codes of ``[G, g, N]`` (K zero-padded to whole groups), ``bits`` each, packed 8 per
  ``bits`` bytes (:func:`lowbit.ops.grid_ops.pack_codes`);
* ``<name>.weight_dtype`` — the group's grid index, ``UINT2`` ``[G, 1, N]``;
* ``<name>.weight_scale`` — float32 ``[G, 1, N]``;
* ``lowbit.mod_grid{b}``  — float32 ``[T · 2^b]``, the grids of :data:`lowbit.quant.mod.GRIDS` row after row;

and the linear's MatMul becomes ``MatMulGrid(X, codes, types, scales, grid; bits, group)``
(:mod:`lowbit.ops.grid_ops`): ``Ŵ = s · L_t[q]``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.ops.grid_ops import pack_codes
from lowbit.ops.registry import DOMAIN
from lowbit.quant.mod import GRIDS, mod_layout

__all__ = ["write_mod_matmul", "mod_file_arrays"]

def mod_file_arrays(q: np.ndarray, s: np.ndarray, t: np.ndarray, bits: int, group: int) -> dict[str, np.ndarray]:
    """The arrays written for codes ``q[K, N]``, scales and grid indices ``[G, N]`` (see the module doc)."""
    k, n = q.shape
    g, nb = mod_layout(k, group)
    codes = np.zeros((nb * g, n), np.uint8)
    codes[:k] = q
    return {"weight_q": pack_codes(codes, bits),
            "weight_dtype": np.asarray(t, np.uint8).reshape(nb, 1, n).astype(ml_dtypes.uint2),
            "weight_scale": np.asarray(s, np.float32).reshape(nb, 1, n)}


def _grid(graph: ir.Graph, bits: int) -> ir.Value:
    name = f"lowbit.mod_grid{bits}"
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, GRIDS[bits].reshape(-1).astype(np.float32))


def write_mod_matmul(graph: ir.Graph, lin_node: ir.Node, name: str, q, s, t, bits: int, group: int, *,
                     origin: str) -> ir.Node:
    """Replace the linear's MatMul by ``lowbit.MatMulGrid`` over the new initializers; returns the new node."""
    arrays = mod_file_arrays(q, s, t, bits, group)
    g = mod_layout(q.shape[0], group)[0]
    inits = [add_initializer(graph, f"{name}.{key}", arr) for key, arr in arrays.items()]
    node = make_node(graph, "MatMulGrid", [lin_node.inputs[0], *inits, _grid(graph, bits)], origin=origin, name=name,
                     domain=DOMAIN, attributes={"bits": bits, "group": g}, before=lin_node)
    out, new = lin_node.outputs[0], node.outputs[0]
    if out.dtype is not None:
        new.shape, new.dtype = out.shape, out.dtype
    replace_value(graph, out, new)
    graph.remove(lin_node, safe=True)
    return node
