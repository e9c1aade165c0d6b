"""Static QDQ linears that ORT would run on float kernels, written as explicit integer GEMMs.

ONNX Runtime fuses ``MatMul + Add`` into a float ``Gemm`` (``MatMulAddFusion``, level 1) before its
QDQ fusions (level 2) look at the MatMul, whenever the MatMul's input is 2-D or has fixed shapes
(GPT-2's Conv1D, OPT's fc2, exports with pinned input shapes).  The QDQ linear

    y = ((x_q − z_x)·s_x) @ (W_q·s_w) + b

is the same number as

    y = Cast(MatMulInteger(x_q, W_q, z_x)) · (s_x·s_w) + b

(exact: the int32 accumulation holds every product sum of int8 × uint8 at these widths), which
ORT cannot fuse into a Gemm and runs on its u8×s8 kernels (``MatMulInteger``, or
``MatMulIntegerToFloat`` after its own fusion).  Only linears whose activation comes from a
``DequantizeLinear`` with a constant scalar scale and uint8 zero point, and whose weight is an
int8 ``DequantizeLinear`` of a constant with a per-tensor or per-output-channel scale and zero
zero point, are rewritten; anything else is left for the caller to report.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node, replace_value

__all__ = ["explicit_integer_linear"]

logger = logging.getLogger(__name__)


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _dq_parts(v: ir.Value) -> tuple[ir.Node, ir.Value, np.ndarray, np.ndarray | None] | None:
    node = v.producer() if v is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if any(a.name == "block_size" and a.as_int() for a in node.attributes.values()):
        return None
    scale = _const(node.inputs[1])
    zp = _const(node.inputs[2]) if len(node.inputs) > 2 else None
    return (node, node.inputs[0], scale, zp) if scale is not None else None


def explicit_integer_linear(graph: ir.Graph, node: ir.Node, origin: str) -> bool:
    """Rewrite the QDQ ``MatMul`` ``node`` as ``MatMulInteger → Cast → Mul``; False if it is not that form."""
    if node.op_type != "MatMul" or len(node.inputs) != 2:
        return False
    act, wt = _dq_parts(node.inputs[0]), _dq_parts(node.inputs[1])
    if act is None or wt is None:
        return False
    _, xq, sx, zx = act
    _, wq, sw, zw = wt
    w = _const(wq)
    if sx.size != 1 or zx is None or zx.dtype != np.uint8 or zx.size != 1 or w is None or w.dtype != np.int8 \
            or w.ndim != 2 or (zw is not None and np.any(zw != 0)) or sw.size not in (1, w.shape[1]):
        return False
    out = node.outputs[0]
    dtype = out.dtype if out.dtype is not None else ir.DataType.FLOAT
    scale = (np.float64(sx.reshape(())) * sw.astype(np.float64).reshape(-1)).astype(dtype.numpy())
    zero = add_initializer(graph, f"{node.name}.x_zero_point", zx.reshape(()).astype(np.uint8))
    mm = make_node(graph, "MatMulInteger", [xq, wq, zero], origin=origin, name=f"{node.name}.integer", before=node)
    cast = make_node(graph, "Cast", [mm.outputs[0]], origin=origin, name=f"{node.name}.to_float",
                     attributes={"to": int(dtype)}, before=node)
    mul = make_node(graph, "Mul", [cast.outputs[0], add_initializer(graph, f"{node.name}.rescale", scale)],
                    origin=origin, name=f"{node.name}.rescale", before=node)
    mul.outputs[0].dtype, mul.outputs[0].shape = out.dtype, out.shape
    replace_value(graph, out, mul.outputs[0])
    dq_nodes = [v.producer() for v in node.inputs]
    graph.remove(node, safe=True)
    for dq in dq_nodes:  # the DequantizeLinears feed nothing else now, nor do their scales
        if dq is not None and not any(list(o.uses()) for o in dq.outputs) and dq.outputs[0] not in graph.outputs:
            consts = [v for v in dq.inputs[1:] if v is not None and v.is_initializer()]
            graph.remove(dq, safe=True)
            for v in consts:
                if not list(v.uses()) and v not in graph.outputs and v.name in graph.initializers:
                    del graph.initializers[v.name]
    logger.debug("%s: static QDQ MatMul written as MatMulInteger", node.name)
    return True
