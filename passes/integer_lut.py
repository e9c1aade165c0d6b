"""Integer-only elementwise non-linearities between 8-bit tensors, as ``lowbit.Lookup`` tables.

Identity.  For ``yq`` an 8-bit tensor with step s and zero point z, and a quantizer with
per-channel steps t_j and zero points u_j after a unary elementwise f::

    Q(f(DQ(yq)))[..., j] = sat(round(f((yq − z)·s) / t_j) + u_j) = T_j[yq]

a function of 256 codes per channel: the table T (computed at compile time, float64 f) *is*
its integer-only form, and the three float ops (DQ, f, Q) become one integer gather.  This
covers GELU between FFN1 and FFN2 (I-BERT's i-GELU polynomial approximates the same function
on int32 inputs; with an 8-bit input a table is exact and cheaper).  Non-linearities whose
input is not an 8-bit tensor — softmax over float Q·Kᵀ, LayerNorm over the float residual —
stay float, and the integer-region checker lists them as float boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ops.registry import DOMAIN, VERSION
from lowbit.ops.integer_ops import QRANGE
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

from lowbit.quant.int8 import match_round_and_clip

__all__ = ["IntegerLut", "UNARY"]


def _gelu(x: np.ndarray, node: ir.Node) -> np.ndarray:
    from scipy.special import erf

    approx = node.attributes.get("approximate")
    if approx is not None and approx.value == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


UNARY = {
    "Gelu": _gelu,
    "Sigmoid": lambda x, node: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, node: np.tanh(x),
    "Relu": lambda x, node: np.maximum(x, 0),
}


@register_pass("integer-lut")
class IntegerLut(Pass):
    @dataclass(frozen=True)
    class Options:
        ops: str = "Gelu|Sigmoid|Tanh|Relu"  # '|'-separated unary ops to turn into tables

        def __post_init__(self):
            bad = [o for o in self.ops.split("|") if o and o not in UNARY]
            if bad:
                raise ValueError(f"integer-lut: unsupported ops {bad}; supported: {', '.join(UNARY)}")

    requires_properties = (QUANTIZED,)

    def call(self, model):
        graph = model.graph
        wanted = set(o for o in self.options.ops.split("|") if o)
        for f in list(graph):
            if f.op_type not in wanted or f.domain not in ("", "ai.onnx"):
                continue
            dq = f.inputs[0].producer()
            uses = list(f.outputs[0].uses())
            if dq is None or dq.op_type != "DequantizeLinear" or len(uses) != 1 or f.outputs[0] in graph.outputs:
                self.stats["skipped"] += 1
                continue
            q = uses[0].node
            s, z = const_array(dq.inputs[1]), const_array(dq.inputs[2]) if len(dq.inputs) > 2 else None
            chain = match_round_and_clip(f.outputs[0])
            if chain is not None:  # migrate-steps' round-and-clip quantizer
                t, u, q = chain
            else:
                t, u = const_array(q.inputs[1]), const_array(q.inputs[2]) if len(q.inputs) > 2 else None
            yq = dq.inputs[0]
            if (q.op_type not in ("QuantizeLinear", "Cast") or s is None or z is None or t is None or u is None or s.size != 1
                    or z.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or u.dtype not in QRANGE
                    or len(list(f.inputs[0].uses())) != 1):
                self.stats["skipped"] += 1
                continue
            lo, hi = QRANGE[z.dtype]
            codes = np.arange(lo, hi + 1, dtype=np.float64)
            x = ((codes - float(z.reshape(-1)[0])) * float(s.reshape(-1)[0])).astype(np.float32).astype(np.float64)
            fx = UNARY[f.op_type](x, f)  # [256]
            t64, u64 = t.astype(np.float64).reshape(-1), u.astype(np.float64).reshape(-1)
            olo, ohi = QRANGE[u.dtype]
            table = np.clip(np.rint(fx[None, :] / t64[:, None]) + u64[:, None], olo, ohi).astype(u.dtype)
            if table.shape[0] == 1:
                table = table[0]
            look = make_node(graph, "Lookup", [yq, add_initializer(graph, f"{f.name}.table", table)], origin=self.name,
                             name=f"{f.name}.lookup", domain=DOMAIN, before=q)
            look.outputs[0].dtype = q.outputs[0].dtype or ir.DataType.from_numpy(u.dtype)
            look.outputs[0].shape = q.outputs[0].shape
            replace_value(graph, q.outputs[0], look.outputs[0])  # a graph output keeps its name
            model.opset_imports[DOMAIN] = VERSION
            self.stats[f.op_type] += 1
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        done = {k: v for k, v in self.stats.items() if k != "skipped"}
        self.ctx.report["integer-lut"] = {"tables": done, "skipped": self.stats["skipped"]}
        return PassResult(model, modified=bool(done))
