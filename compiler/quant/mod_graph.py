"""The file form of a mixture-of-data-types weight (``lowbit.quant.mod``): one ``lowbit.MatMulGrid`` node.

The file holds three initializers per weight and one grid table per bit width (shared by all layers):

* ``<name>.weight_q``     — codes of ``[G, g, N]`` (K zero-padded to whole groups), ``bits`` each, packed 8 per
  ``bits`` bytes (:func:`lowbit.ops.grid_ops.pack_codes`);
* ``<name>.weight_dtype`` — the group's grid index, ``UINT2`` ``[G, 1, N]``;
* ``<name>.weight_scale`` — float32 ``[G, 1, N]``;
* ``lowbit.mod_grid{b}``  — float32 ``[T · 2^b]``, the grids of :data:`lowbit.quant.mod.GRIDS` row after row;

and the linear's MatMul becomes ``MatMulGrid(X, codes, types, scales, grid; bits, group)``
(:mod:`lowbit.ops.grid_ops`): ``Ŵ = s · L_t[q]``.

Smaller scales (``scale_dtype``, :func:`lowbit.quant.mod.scale_snapper`): ``float16`` stores
``weight_scale`` as float16 behind a ``Cast`` to float; ``uint8`` stores ``weight_scale`` as uint8 codes
``c`` and ``weight_scale_step`` (float32 ``[1, 1, N]``) and feeds ``Cast(c)·step``.  Both are constant
subgraphs that a runtime folds once.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.ops.grid_ops import pack_codes
from lowbit.ops.registry import DOMAIN
from lowbit.quant.mod import GRIDS, mod_layout, scale_step

__all__ = ["write_mod_matmul", "mod_file_arrays"]

def mod_file_arrays(q: np.ndarray, s: np.ndarray, t: np.ndarray, bits: int, group: int,
                    scale_dtype: str = "float32", weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The arrays written for codes ``q[K, N]``, scales and grid indices ``[G, N]`` (see the module doc);
    ``weight`` (the float ``W[K, N]`` the scales were fitted to) gives the uint8 scales' step."""
    k, n = q.shape
    g, nb = mod_layout(k, group)
    codes = np.zeros((nb * g, n), np.uint8)
    codes[:k] = q
    out = {"weight_q": pack_codes(codes, bits),
           "weight_dtype": np.asarray(t, np.uint8).reshape(nb, 1, n).astype(ml_dtypes.uint2)}
    s = np.asarray(s, np.float32).reshape(nb, 1, n)
    if scale_dtype == "float32":
        out["weight_scale"] = s
    elif scale_dtype == "float16":
        out["weight_scale"] = s.astype(np.float16)
        if not np.array_equal(out["weight_scale"].astype(np.float32), s):
            raise ValueError("scales are not float16 values: quantize with scale_dtype=float16")
    elif scale_dtype == "uint8":
        step = scale_step(weight, bits).astype(np.float32).reshape(1, 1, n)
        c = np.rint(s / step)
        if c.min() < 1 or c.max() > 255 or not np.allclose(c * step, s, rtol=1e-5, atol=0):
            raise ValueError("scales are not uint8 multiples of the weight's step: quantize with scale_dtype=uint8")
        out["weight_scale"], out["weight_scale_step"] = c.astype(np.uint8), step
    else:
        raise ValueError(f"scale_dtype must be float32, float16 or uint8, got {scale_dtype}")
    return out


def _grid(graph: ir.Graph, bits: int) -> ir.Value:
    name = f"lowbit.mod_grid{bits}"
    if name in graph.initializers:
        return graph.initializers[name]
    return add_initializer(graph, name, GRIDS[bits].reshape(-1).astype(np.float32))


def write_mod_matmul(graph: ir.Graph, lin_node: ir.Node, name: str, q, s, t, bits: int, group: int, *,
                     origin: str, scale_dtype: str = "float32", weight: np.ndarray | None = None) -> ir.Node:
    """Replace the linear's MatMul by ``lowbit.MatMulGrid`` over the new initializers; returns the new node."""
    arrays = mod_file_arrays(q, s, t, bits, group, scale_dtype, weight)
    g = mod_layout(q.shape[0], group)[0]
    inits = {key: add_initializer(graph, f"{name}.{key}", arr) for key, arr in arrays.items()}
    scales = inits["weight_scale"]
    if scale_dtype != "float32":
        scales = make_node(graph, "Cast", [scales], origin=origin, name=f"{name}.scale_cast",
                           attributes={"to": int(ir.DataType.FLOAT)}, before=lin_node).outputs[0]
    if scale_dtype == "uint8":
        scales = make_node(graph, "Mul", [scales, inits["weight_scale_step"]], origin=origin,
                           name=f"{name}.scale_mul", before=lin_node).outputs[0]
    node = make_node(graph, "MatMulGrid", [lin_node.inputs[0], inits["weight_q"], inits["weight_dtype"], scales,
                                           _grid(graph, bits)], origin=origin, name=name,
                     domain=DOMAIN, attributes={"bits": bits, "group": g}, before=lin_node)
    out, new = lin_node.outputs[0], node.outputs[0]
    if out.dtype is not None:
        new.shape, new.dtype = out.shape, out.dtype
    replace_value(graph, out, new)
    graph.remove(lin_node, safe=True)
    return node
