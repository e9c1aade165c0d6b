"""Integer attention: Q·Kᵀ and P·V as uint8×uint8→int32 GEMMs, softmax by an exact exp table.

Identity.  Q, K, V leave their linears as 8-bit codes, ``Q = s_q·(q − z_q)`` (per tensor), and only
Reshape/Transpose (which commute with the affine map) and a constant scale α stand between them and
the score GEMM, so ``α_q·α_k·Q·Kᵀ = α_q α_k s_q s_k·(q − z_q)(k − z_k)ᵀ = σ·MatMulInteger(q, k; z_q, z_k)``.
The scores are requantized to int8 logits with step s_x (calibrated |scores| / 127):
``x = Requantize(acc; σ/s_x)``.  An additive mask ``Where(keep, 0, −big)`` becomes IntSoftmax's
``keep``; softmax of the logits is ``lowbit.IntSoftmax`` with table round(2^15·exp(−k·s_x)),
giving P as uint8 codes of step 1/255.  Then ``P·V = (s_v/255)·MatMulInteger(p, v; 0, z_v)``,
and the context goes through the same Transpose/Reshape in int32 and is requantized per channel
to the next linear's input codes (migrate-steps' round-and-clip quantizer, steps t_j, zero points
u_j): ``Requantize(acc; (s_v/255)/t_j, u_j)``.  Overflow: |acc| ≤ 255²·K for K < 33 000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ir.rewrite import add_initializer, make_node
from lowbit.ir.value_ranges import absmax
from lowbit.ops.integer_nonlinear import exp_table
from lowbit.ops.integer_ops import dyadic
from lowbit.ops.registry import DOMAIN, VERSION
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass
from lowbit.quant.int8 import match_round_and_clip

__all__ = ["IntegerAttention"]

_MOVES = ("Reshape", "Transpose")


@dataclass
class _Operand:
    dq: ir.Node  # DequantizeLinear of 8-bit codes (per tensor)
    moves: list[ir.Node]  # Reshape/Transpose from the codes to the GEMM, in order
    factor: float  # constant scales on the way (Mul/Div)


def _scalar(v: ir.Value) -> float | None:
    a = const_array(v)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _trace(v: ir.Value) -> _Operand | None:
    """Walk a GEMM operand back through Reshape/Transpose/scalar Mul/Div to a per-tensor 8-bit DQ."""
    moves, factor = [], 1.0
    while True:
        p = v.producer()
        if p is None:
            return None
        if p.op_type in _MOVES:
            moves.append(p)
            v = p.inputs[0]
        elif p.op_type in ("Mul", "Div") and _scalar(p.inputs[1]) is not None:
            s = _scalar(p.inputs[1])
            factor = factor * s if p.op_type == "Mul" else factor / s
            v = p.inputs[0]
        elif p.op_type == "DequantizeLinear":
            s, z = const_array(p.inputs[1]), const_array(p.inputs[2]) if len(p.inputs) > 2 else None
            if s is None or s.size != 1 or z is None or z.size != 1 or z.dtype != np.uint8:
                return None
            return _Operand(p, moves[::-1], factor)
        else:
            return None


def _keep_of(mask: ir.Value) -> ir.Value | None:
    """``Where(keep, 0, −big)`` → keep."""
    w = mask.producer()
    if w is None or w.op_type != "Where":
        return None
    a, b = _scalar(w.inputs[1]), _scalar(w.inputs[2])
    return w.inputs[0] if a == 0.0 and b is not None and b <= -1e4 else None


@register_pass("integer-attention")
class IntegerAttention(Pass):
    @dataclass(frozen=True)
    class Options:
        pass

    requires_properties = (QUANTIZED,)

    def _match(self, sm: ir.Node):
        x = sm.inputs[0]
        keep, scores = None, x
        add = x.producer()
        if add is not None and add.op_type == "Add":
            for i in (0, 1):
                if (k := _keep_of(add.inputs[1 - i])) is not None and add.inputs[i].producer() is not None:
                    keep, scores = k, add.inputs[i]
        qk = scores.producer()
        axis = sm.attributes["axis"].value if "axis" in sm.attributes else -1
        if qk is None or qk.op_type != "MatMul" or axis not in (-1, 3):
            return None
        a, b = _trace(qk.inputs[0]), _trace(qk.inputs[1])
        p = sm.outputs[0]
        for u in list(p.uses()):  # the NaN guard of fully masked rows: Where(IsNaN(p), 0, p)
            if u.node.op_type == "IsNaN":
                w = [w.node for w in u.node.outputs[0].uses() if w.node.op_type == "Where"]
                if w and w[0].inputs[2] is p:
                    p = w[0].outputs[0]
        pv = [u.node for u in p.uses() if u.node.op_type == "MatMul" and u.idx == 0]
        if a is None or b is None or len(pv) != 1:
            return None
        v = _trace(pv[0].inputs[1])
        post, out = [], pv[0].outputs[0]
        while (chain := match_round_and_clip(out)) is None:
            uses = list(out.uses())
            if len(uses) != 1 or uses[0].node.op_type not in _MOVES:
                return None
            post.append(uses[0].node)
            out = uses[0].node.outputs[0]
        if v is None or v.factor != 1.0:
            return None
        return keep, scores, a, b, v, post, chain

    def call(self, model):
        graph = model.graph
        sites = [(sm, m) for sm in list(graph) if sm.op_type == "Softmax" and (m := self._match(sm)) is not None]
        self.stats["skipped"] = sum(1 for n in graph if n.op_type == "Softmax") - len(sites)
        if not sites:
            return PassResult(model, modified=False)
        if not self.ctx.calibration:
            self.fail("logit steps need calibration samples", hint="pass calibration=... / --calibration")
        rng = absmax(model, [m[1] for _, m in sites], self.ctx.calibration)
        model.opset_imports[DOMAIN] = VERSION
        for sm, m in sites:
            self._rewrite(graph, sm, rng[m[1].name] / 127.0 or 1.0, *m)
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)  # Shape readers of the float chains now read codes made later
        self.ctx.report["integer-attention"] = dict(self.stats)
        return PassResult(model, modified=True)

    def _rewrite(self, graph, sm, s_x, keep, scores, a, b, v, post, chain) -> None:
        name = sm.name or "softmax"
        at = chain[2]  # everything is emitted before the quantizer it replaces

        def node(op, inputs, suffix, domain="", **attrs):
            return make_node(graph, op, inputs, origin=self.name, name=f"{name}.{suffix}", attributes=attrs,
                             domain=domain, before=at).outputs[0]

        def const(suffix, arr):
            return add_initializer(graph, f"{name}.{suffix}", np.asarray(arr))

        def replay(codes: ir.Value, moves: list[ir.Node], tag: str) -> ir.Value:
            for i, mv in enumerate(moves):
                new = node(mv.op_type, [codes, *mv.inputs[1:]], f"{tag}{i}", **dict(mv.attributes.items()))
                for u in list(mv.outputs[0].uses()):  # Shape readers of the float chain read the codes (same shape)
                    if u.node.op_type == "Shape":
                        u.node.replace_input_with(u.idx, new)
                codes = new
            return codes

        def qparams(op: _Operand):
            return float(const_array(op.dq.inputs[1]).reshape(-1)[0]), op.dq.inputs[2]

        (sa, za), (sb, zb), (sv, zv) = qparams(a), qparams(b), qparams(v)
        aq = replay(a.dq.inputs[0], a.moves, "q_codes")
        bq = replay(b.dq.inputs[0], b.moves, "k_codes")
        acc = node("MatMulInteger", [aq, bq, za, zb], "qk_int")
        acc.dtype = ir.DataType.INT32
        bb, cc, _ = dyadic(np.array([sa * sb * a.factor * b.factor / s_x]), 30)
        logits = node("Requantize", [acc, const("logit_mult", bb.reshape(())), const("logit_shift", cc.reshape(())),
                                     const("logit_zp", np.int8(0))], "logits", domain=DOMAIN)
        logits.dtype = ir.DataType.INT8
        ins = [logits, const("exp_table", exp_table(s_x))] + ([keep] if keep is not None else [])
        p = node("IntSoftmax", ins, "probs", domain=DOMAIN)
        p.dtype = ir.DataType.UINT8
        vq = replay(v.dq.inputs[0], v.moves, "v_codes")
        ctx = node("MatMulInteger", [p, vq, const("p_zp", np.uint8(0)), zv], "pv_int")
        ctx.dtype = ir.DataType.INT32
        ctx = replay(ctx, post, "ctx")
        t, u, cast = chain
        b2, c2, _ = dyadic(sv / 255.0 / np.asarray(t, np.float64), 30, shared_shift=True)
        y = node("Requantize", [ctx, const("ctx_mult", b2), const("ctx_shift", c2), const("ctx_zp", u)], "ctx_q",
                 domain=DOMAIN)
        y.dtype = ir.DataType.UINT8
        cast.outputs[0].replace_all_uses_with(y)
        self.stats["attention"] += 1
