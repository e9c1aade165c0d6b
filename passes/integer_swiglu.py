"""Integer SwiGLU: silu(gate)·up between 8-bit codes, by an exact silu table and an int32 product.

Identity.  The gate and up projections leave as 8-bit codes, ``G = s_g·(g − z_g)``, ``U = s_u·(u − z_u)``
(``dyadic``'s Requantize outputs).  silu(G) is a function of the 256 gate codes, so the table
``T[g] = round(silu(s_g·(g − z_g)) / s_s)`` (int16, s_s = max|silu| / 32767) is its integer form, and

    silu(G)·U ≈ s_s·s_u · T[g]·(u − z_u)          (|T·(u − z_u)| ≤ 32767·255 < 2^23: exact in int32)

The down projection's input quantizer (migrate-steps' round-and-clip, per-channel steps t_j and zero
points u_j) becomes ``Requantize(T[g]·(u − z_u); s_s·s_u / t_j, u_j)``: from the two linears' codes
to the next linear's codes with no float op.  The only rounding added to the float path is the
table's, at 2^-15 of the largest silu value.

The up codes need no table, so where the up projection's Requantize feeds only this product it is
widened to int16 on the same range (``widened_requantize``: step s_u/257): |T·(u − z_u)| ≤ 32767·65535
< 2^31 still fits int32, and the up projection's 8-bit rounding leaves the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.ops.integer_ops import QRANGE, dyadic, widened_requantize
from lowbit.ops.registry import DOMAIN, VERSION
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass
from lowbit.quant.int8 import match_round_and_clip

__all__ = ["IntegerSwiglu"]


def _codes(v: ir.Value):
    """A per-tensor 8-bit DQ's (codes, step, zero point), else None."""
    dq = v.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3:
        return None
    s, z = const_array(dq.inputs[1]), const_array(dq.inputs[2])
    if s is None or z is None or s.size != 1 or z.size != 1 or z.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)):
        return None
    return dq.inputs[0], float(s.reshape(-1)[0]), z.reshape(())


def _match(mul: ir.Node):
    """Mul(Mul(G, Sigmoid(G)), U) [either operand order] → (gate codes, up codes, quantizer chain)."""
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
        return None
    for i in (0, 1):
        silu = mul.inputs[i].producer()
        if silu is None or silu.op_type != "Mul":
            continue
        for j in (0, 1):
            sig = silu.inputs[1 - j].producer()
            if sig is not None and sig.op_type == "Sigmoid" and sig.inputs[0] is silu.inputs[j]:
                gate, up = _codes(silu.inputs[j]), _codes(mul.inputs[1 - i])
                chain = match_round_and_clip(mul.outputs[0])
                if gate is not None and up is not None and chain is not None:
                    return gate, up, chain
    return None


@register_pass("integer-swiglu")
class IntegerSwiglu(Pass):
    @dataclass(frozen=True)
    class Options:
        wide_up: bool = True  # int16 up codes when the up projection's Requantize feeds only the product

    requires_properties = (QUANTIZED,)

    def call(self, model):
        graph = model.graph
        sites = [(n, m) for n in list(graph) if (m := _match(n)) is not None]
        if not sites:
            return PassResult(model, modified=False)
        model.opset_imports[DOMAIN] = VERSION
        for mul, (gate, up, chain) in sites:
            self._rewrite(graph, mul, gate, up, chain)
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        self.ctx.report["integer-swiglu"] = dict(self.stats)
        return PassResult(model, modified=True)

    def _rewrite(self, graph, mul, gate, up, chain) -> None:
        (gq, s_g, z_g), (uq, s_u, z_u) = gate, up
        t, u, cast = chain
        name = mul.name or "swiglu"

        def node(op, inputs, suffix, domain="", **attrs):
            return make_node(graph, op, inputs, origin=self.name, name=f"{name}.{suffix}", attributes=attrs,
                             domain=domain, before=cast).outputs[0]

        def const(suffix, arr):
            return add_initializer(graph, f"{name}.{suffix}", np.asarray(arr))

        if self.options.wide_up and (wide := self._widen(graph, uq, s_u, z_u, name, cast)) is not None:
            uq, s_u, z_u = wide
            self.stats["wide_up"] += 1
        lo, hi = QRANGE[z_g.dtype]
        x = (np.arange(lo, hi + 1, dtype=np.float64) - float(z_g)) * s_g
        silu = x / (1.0 + np.exp(-x))
        s_s = float(np.abs(silu).max()) / 32767.0 or 1.0
        table = np.round(silu / s_s).astype(np.int16)
        look = node("Lookup", [gq, const("silu_table", table)], "silu", domain=DOMAIN)
        look.dtype = ir.DataType.INT16
        a = node("Cast", [look], "silu_i32", to=ir.DataType.INT32)
        b = node("Sub", [node("Cast", [uq], "up_i32", to=ir.DataType.INT32), const("up_zp", np.int32(z_u))], "up")
        prod = node("Mul", [a, b], "product")
        prod.dtype = ir.DataType.INT32
        m, c, _ = dyadic(s_s * s_u / np.asarray(t, np.float64), 30, shared_shift=True)
        y = node("Requantize", [prod, const("mult", m), const("shift", c), const("zp", u)], "down_q", domain=DOMAIN)
        y.dtype = ir.DataType.UINT8
        replace_value(graph, cast.outputs[0], y)
        self.stats["swiglu"] += 1

    def _widen(self, graph, uq: ir.Value, s_u: float, z_u: np.ndarray, name: str, before: ir.Node):
        """An int16 twin of the up projection's 8-bit Requantize, or None when its codes have other readers."""
        rq = uq.producer()
        if rq is None or rq.op_type != "Requantize" or rq.domain != DOMAIN or len(list(uq.uses())) != 1:
            return None
        dq_out = list(uq.uses())[0].node.outputs[0]
        if len(list(dq_out.uses())) != 1 or dq_out in graph.outputs:
            return None
        b, c, z = (const_array(v) for v in rq.inputs[1:4])
        if b is None or c is None or z is None or np.any(z != z_u):
            return None
        b2, c2, z2, _ = widened_requantize(b, c, z, np.float64(s_u))
        consts = [add_initializer(graph, f"{name}.up_wide_{k}", a) for k, a in
                  (("mult", b2), ("shift", c2), ("zero_point", z2))]
        u16 = make_node(graph, "Requantize", [rq.inputs[0], *consts], origin=self.name, name=f"{name}.up_wide",
                        domain=DOMAIN, before=before).outputs[0]
        u16.dtype = ir.DataType.INT16
        return u16, s_u / 257.0, z2.reshape(())  # exact step; the float32 s2 is for a DequantizeLinear
