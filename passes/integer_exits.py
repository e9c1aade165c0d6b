"""Float exits of the integer graph get int16 codes: an 8-bit Requantize that only a float op reads.

Identity.  ``dyadic`` requantizes every linear's accumulator to 8-bit codes, the form the integer
consumers need (lookup tables, attention, the SwiGLU product).  Where none of them took the codes —
``DQ(Requantize(acc; b, c, z); s, z)`` is read by float ops, e.g. Q/K/V of a RoPE attention, which
stays float — the 8-bit rounding buys nothing and costs accuracy.  Such a pair becomes

    DQ(Requantize(acc; b', c', z'); s/257, z'),   b'/2^c' ≈ 257·b/2^c,   z' = (z − qmin)·257 − 32768

(:func:`lowbit.ops.integer_ops.widened_requantize`): the same clipping range on the int16 grid, 257×
finer.  The accumulator, the multiplier's 30-bit bound and the overflow proof of ``dyadic`` are
unchanged (|acc + k|·b' < 2^31·2^30).  Run it after the integer passes, so that it widens only what
they left float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.ops.integer_ops import widened_requantize
from lowbit.ops.registry import DOMAIN
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass

__all__ = ["IntegerExits", "float_exit"]


def float_exit(rq: ir.Node) -> ir.Node | None:
    """The DequantizeLinear that is the only reader of an 8-bit ``lowbit.Requantize`` with constant operands."""
    if rq.op_type != "Requantize" or rq.domain != DOMAIN or len(rq.inputs) < 4:
        return None
    uses = list(rq.outputs[0].uses())
    if len(uses) != 1 or rq.outputs[0] in rq.graph.outputs:
        return None
    dq = uses[0].node
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or uses[0].idx != 0 or len(dq.inputs) < 3:
        return None
    consts = [const_array(v) for v in (*rq.inputs[1:4], dq.inputs[1], dq.inputs[2])]
    if any(a is None for a in consts):
        return None
    b, c, z, s, z_dq = consts
    if z.dtype not in (np.dtype(np.uint8), np.dtype(np.int8)) or z.shape != z_dq.shape or np.any(z != z_dq):
        return None
    if s.size != 1 and (dq.attributes.get("axis") is None or dq.attributes["axis"].value not in (-1,)):
        return None
    return dq


@register_pass("integer-exits")
class IntegerExits(Pass):
    @dataclass(frozen=True)
    class Options:
        pass

    requires_properties = (QUANTIZED,)

    def call(self, model):
        graph = model.graph
        for rq in list(graph):
            dq = float_exit(rq)
            if dq is None:
                continue
            b, c, z, s = (const_array(v) for v in (*rq.inputs[1:4], dq.inputs[1]))
            b2, c2, z2, s2 = widened_requantize(b, c, z, s)
            name = rq.name or "requantize"

            def const(suffix, arr, name=name):
                return add_initializer(graph, f"{name}.wide_{suffix}", np.asarray(arr))

            y16 = make_node(graph, "Requantize", [rq.inputs[0], const("mult", b2), const("shift", c2),
                                                   const("zero_point", z2)],
                            origin=self.name, name=f"{name}.wide", domain=DOMAIN, before=dq).outputs[0]
            y16.dtype = ir.DataType.INT16
            attrs = {"axis": dq.attributes["axis"].value} if "axis" in dq.attributes else {}
            y = make_node(graph, "DequantizeLinear", [y16, const("step", s2), const("dq_zero_point", z2)],
                          origin=self.name, name=f"{name}.wide_dq", attributes=attrs, before=dq).outputs[0]
            y.dtype, y.shape = ir.DataType.FLOAT, dq.outputs[0].shape
            replace_value(graph, dq.outputs[0], y)
            self.stats["widened"] += 1
        if not self.stats["widened"]:
            return PassResult(model, modified=False)
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        self.ctx.report["integer-exits"] = {"widened": self.stats["widened"]}
        return PassResult(model, modified=True)
