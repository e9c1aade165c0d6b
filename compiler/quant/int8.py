"""8-bit quantization arithmetic shared by the W8A8 passes (quantize, quantize-acts, migrate-steps).

Weights: per output channel, symmetric int8 in [-127, 127], ``s_w[n] = max|W[:, n]| / 127``.
Static activations: asymmetric uint8 with ``step = (max(hi,0) − min(lo,0)) / 255``,
``zp = round(−lo/step)``.  Per-token rounding: ``t = max(max|x_row|, 1e-12) / qmax``, ``round(x/t)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lowbit.errors import InvalidWeightsError, UnsupportedModelError
from lowbit.ir.rewrite import add_initializer, make_node

__all__ = ["quantize_weight_int8", "per_token_round", "static_act_params", "match_round_and_clip"]


def quantize_weight_int8(w: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: returns (Wq int8 [K, N], scale float32 [N])."""
    if w.size == 0:
        raise UnsupportedModelError(f"weight '{name}' has a zero-sized dimension (shape {tuple(w.shape)})",
                                    hint="the layer computes nothing; remove it or fix the export")
    if not np.all(np.isfinite(w)):
        bad = np.argwhere(~np.isfinite(w))[0]
        raise InvalidWeightsError(f"weight '{name}' holds NaN/Inf (first at index {tuple(int(i) for i in bad)})",
                                  hint="fix or re-export the model; lowbit cannot quantize non-finite weights")
    amax = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # all-zero column: any scale is exact
    wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return wq, scale


def per_token_round(graph: ir.Graph, x: ir.Value, qmax: float, *, name: str, before: ir.Node,
                    origin: str) -> tuple[ir.Value, ir.Value]:
    """``(round(x / t), t)`` with one step per token (last axis): ``t = max(max|x_row|, 1e-12) / qmax``."""

    def node(op, inputs, suffix, **attrs):
        return make_node(graph, op, inputs, origin=origin, name=f"{name}.act_{suffix}", attributes=attrs,
                         before=before).outputs[0]

    def const(suffix, arr):
        return add_initializer(graph, f"{name}.act_{suffix}", arr)

    amax = node("ReduceMax", [node("Abs", [x], "abs"), const("axes", np.array([-1], np.int64))], "absmax",
                keepdims=1)
    t = node("Div", [node("Max", [amax, const("eps", np.array(1e-12, np.float32))], "floor"),
                     const("qmax", np.array(qmax, np.float32))], "step")
    return node("Round", [node("Div", [x, t], "scaled")], "round"), t


def static_act_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / 255.0
    if step == 0:
        step = 1.0  # the activation is all zeros: any step is exact
    zp = int(np.clip(np.round(-lo / step), 0, 255))
    return np.float32(step), np.uint8(zp)


def match_round_and_clip(value: ir.Value):
    """If ``value``'s only use starts migrate-steps' quantizer chain, return (steps, zero points, Cast node)."""
    def single(v, op):
        uses = list(v.uses())
        return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op else None

    def const_of(node):
        arrs = [v.const_value.numpy() for v in node.inputs[1:] if v is not None and v.const_value is not None]
        return arrs[0] if len(arrs) == 1 else None

    steps = None
    n = single(value, "Mul")
    if n is not None:
        inv = const_of(n)
        if inv is None:
            return None
        steps, value = 1.0 / inv.astype(np.float64), n.outputs[0]
    r = single(value, "Round")
    a = r and single(r.outputs[0], "Add")
    c = a and single(a.outputs[0], "Clip")
    cast = c and single(c.outputs[0], "Cast")
    if cast is None or const_of(a) is None or cast.outputs[0].dtype != ir.DataType.UINT8:
        return None
    z = const_of(a)
    return (np.ones_like(z, np.float64) if steps is None else steps), z.astype(np.uint8), cast
