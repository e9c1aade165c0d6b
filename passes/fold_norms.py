"""Norm folding.  norm(x; γ, β)·W + b = norm(x; 1, 0)·(diag(γ)·W) + (β·W + b).

A norm's scale γ multiplies its output per channel, and its shift β adds a constant row; both
are affine in the normalised value, so they move into every linear that reads the norm output (directly or through
reshapes that keep the channel axis, GPT-2's Conv1D):
γ scales the weight rows, β·W joins the bias (an ``Add`` is created for a linear that had none).
The norm is left with γ = 1 (and β = 0), which rotation needs: RMSNorm(x·Q) = RMSNorm(x)·Q for an
orthogonal Q only when γ = 1.  A norm whose output also feeds anything but linears is skipped and
counted (folding would change that other consumer).  Float outputs are unchanged up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import (NORM_INPUTS, NORM_OPS, Linear, channel_readers, const_array, find_linears,
                                value_users)
from lowbit.quant.stats import META_KEY, act_stats
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_uses_in, set_input_const

__all__ = ["FoldNorms", "add_bias"]


def add_bias(graph: ir.Graph, lin: Linear, bias: np.ndarray, origin: str) -> None:
    """``lin``'s output += ``bias`` (a new ``Add`` after the MatMul when it has no bias yet)."""
    if lin.bias is not None:
        idx = list(lin.bias_node.inputs).index(lin.bias)
        set_input_const(graph, lin.bias_node, idx, lin.bias.const_value.numpy() + bias.astype(np.float32))
        return
    out = lin.node.outputs[0]
    users = [u.node for u in out.uses()]
    b = add_initializer(graph, f"{lin.name}.bias", bias.astype(np.float32))
    add = make_node(graph, "Add", [out, b], origin=origin, name=f"{lin.name}.bias_add")
    if out.dtype is not None:  # a graph output must stay typed
        add.outputs[0].dtype = out.dtype
    if out.shape is not None:
        add.outputs[0].shape = ir.Shape(out.shape)
    graph.remove(add, safe=False)
    graph.insert_after(lin.node, add)
    replace_uses_in(users, out, add.outputs[0])
    if out in graph.outputs:
        graph.outputs[graph.outputs.index(out)] = add.outputs[0]
        add.outputs[0].name, out.name = out.name, f"{out.name}_nobias"
    lin.bias, lin.bias_node = b, add


@register_pass("fold-norms")
class FoldNorms(Pass):
    @dataclass(frozen=True)
    class Options:
        bias: bool = True  # fold β (LayerNorm) into the linears' bias

    float_equivalent = True
    invalidates_properties = (CALIBRATED, HESSIAN)  # β folded: the norm output's statistics are dropped

    def call(self, model):
        graph = model.graph
        by_input: dict[ir.Value, list[Linear]] = {}
        for lin in find_linears(graph):
            by_input.setdefault(lin.input, []).append(lin)
        modified = False
        for node in list(graph):
            if node.op_type not in NORM_OPS:
                continue
            out = node.outputs[0]
            n = out.shape[-1] if out.shape is not None and len(out.shape) else None
            consumers = channel_readers(out, by_input, n) if isinstance(n, int) else None
            if consumers is None and not isinstance(n, int):  # unknown width: direct readers only
                consumers = by_input.get(out, [])
                consumers = consumers if set(value_users(out)) == {c.node for c in consumers} else None
            if not consumers or out in graph.outputs:
                self.stats["skipped_non_linear_consumer"] += 1
                continue
            gi, bi = NORM_INPUTS[node.op_type]
            bi = bi if bi is not None else len(node.inputs)  # no β input
            gamma = const_array(node.inputs[gi]) if len(node.inputs) > gi and node.inputs[gi] is not None else None
            beta = const_array(node.inputs[bi]) if len(node.inputs) > bi and node.inputs[bi] is not None else None
            if (len(node.inputs) > gi and node.inputs[gi] is not None and gamma is None) or \
                    (len(node.inputs) > bi and node.inputs[bi] is not None and beta is None):
                self.stats["skipped_non_constant_scale"] += 1
                continue
            if beta is not None and not self.options.bias and np.any(beta != 0):
                self.stats["skipped_beta"] += 1
                continue
            n = consumers[0].shape[0]
            g = np.ones(n, np.float32) if gamma is None else np.broadcast_to(gamma, (n,)).astype(np.float64)
            b = None if beta is None else np.broadcast_to(beta, (n,)).astype(np.float64)
            if np.all(g == 1) and (b is None or np.all(b == 0)):
                self.stats["already_unit"] += 1
                continue
            for lin in consumers:
                w = lin.weight.const_value.numpy().astype(np.float64)
                if b is not None and np.any(b != 0):
                    add_bias(graph, lin, b @ w, self.name)
                set_input_const(graph, lin.node, 1, g[:, None] * w)
            if gamma is not None:
                set_input_const(graph, node, gi, np.ones_like(gamma))
            if beta is not None:
                set_input_const(graph, node, bi, np.zeros_like(beta))
            stats = act_stats(out)
            if stats is not None:
                if b is None and np.all(g != 0):
                    stats.scale_channels(g)
                else:
                    out.meta.pop(META_KEY, None)
            self.stats["folded"] += 1
            modified = True
        graph.meta.pop("lowbit.names", None)
        return PassResult(model, modified=modified)
