"""Integer LayerNorm / RMSNorm over an integer residual stream, residual adds aligned by dyadic rescale.

Identity.  Let X = P + Q be a norm's input (a residual add) with one step s_X for both operands,
chosen from calibration so each fits int16: s_X = max(|P|, |Q|, |X|) / 32767.  Then
``X/s_X = P/s_X + Q/s_X`` and the sum of two int16 codes is exact in int32.  Each operand's codes
come from where it was made:

* a linear's output ``DQ(Requantize(acc; b, c, z); s_o, z)`` → ``Requantize(acc; b', c', 0) → int16``
  with b'/2^c' ≈ (b/2^c)·s_o/s_X (the same accumulator, rescaled straight to the residual step);
* a norm's output → that norm's own ``IntNorm`` emits int16 codes at step s_X (γ/s_X folded in g);
* the previous residual sum (pre-norm decoders: the stream feeds the next add and a norm) → its
  int32 codes at step s_P, ``Requantize(·; s_P/s_X) → int16``;
* anything else (the embedding sum) → ``QuantizeLinear(·; s_X, int16)``: the float→integer entry.

A norm ``N(X)`` on codes x = X/s_X is ``lowbit.IntNorm``: LayerNorm is invariant to the input
scale (ε in code units becomes n_min = ⌈C²·ε/s_X²⌉), RMSNorm likewise, so with output step s_o
(per channel: the migrated steps of the linears that read it, and zero points u)
``g = round(γ/s_o·2^(c−F))``, ``bias = round(β/s_o·2^c)``.  The clone norms of ``migrate-steps``
whose outputs feed a round-and-clip quantizer become IntNorms with uint8 output (the quantizer is
absorbed); norms feeding the residual emit int16; a norm output that is a graph output is read
through ``DequantizeLinear`` (the integer→float exit).  A clone whose residual-side twin is already
an IntNorm (γ' = γ/m, β' = β/m) reads the twin's int16 codes y instead of normalising again:
``Requantize(y; s_y/(m_j·t_j), u_j)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.ir.value_ranges import absmax
from lowbit.ops.integer_ops import dyadic
from lowbit.ops.registry import DOMAIN, VERSION
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass
from lowbit.quant.int8 import match_round_and_clip

__all__ = ["IntegerNorms"]

_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
I16 = 32767


@register_pass("integer-norms")
class IntegerNorms(Pass):
    @dataclass(frozen=True)
    class Options:
        frac_bits: int = 20  # F: fractional bits of the normalised value
        shift: int = 36  # c: the output shift (g carries 2^(c−F))

        def __post_init__(self):
            if not 8 <= self.frac_bits <= 30 or not self.frac_bits < self.shift <= 44:
                raise ValueError(f"integer-norms: needs 8 <= frac_bits <= 30 and frac_bits < shift <= 44, got "
                                 f"{self.frac_bits}, {self.shift}")

    requires_properties = (QUANTIZED,)

    def call(self, model):
        graph = model.graph
        groups: dict[ir.Value, list[ir.Node]] = {}
        for n in graph:
            if n.op_type in _NORMS and n.domain in ("", "ai.onnx"):
                groups.setdefault(n.inputs[0], []).append(n)
        if not groups:
            return PassResult(model, modified=False)
        if not self.ctx.calibration:
            self.fail("residual steps need calibration samples", hint="pass calibration=... / --calibration")
        probe = []
        for x in groups:
            add = x.producer()
            probe += [x] + (list(add.inputs) if add is not None and add.op_type == "Add" else [])
        probe += [n.outputs[0] for ns in groups.values() for n in ns]
        rng = absmax(model, probe, self.ctx.calibration)
        step = {}
        for x in groups:
            add = x.producer()
            parts = list(add.inputs) if add is not None and add.op_type == "Add" else []
            step[x] = max([rng[x.name]] + [rng[v.name] for v in parts]) / I16 or 1.0
        # the step a norm's residual output must carry: that of the add reading it (or its own range)
        out_step: dict[ir.Value, float] = {}
        for x in groups:
            add = x.producer()
            if add is not None and add.op_type == "Add":
                for v in add.inputs:
                    if v.producer() is not None and v.producer().op_type in _NORMS:
                        out_step[v] = step[x]
        model.opset_imports[DOMAIN] = VERSION
        codes: dict[ir.Value, ir.Value] = {}  # float norm output → its int16 codes (made when the norm is)
        residual: dict[ir.Value, tuple[ir.Value, float]] = {}  # norm input → (int32 codes, step): pre-norm streams
        for x, norms in groups.items():  # graph order: a norm is rewritten before the add that reads it
            x32 = self._input_codes(graph, x, step[x], codes, norms[0], residual)
            residual[x] = (x32, step[x])
            made: dict = {}  # this input's residual-side IntNorm: its clones requantize its output
            for norm in sorted(norms, key=lambda n: match_round_and_clip(n.outputs[0]) is not None):
                if not self._from_sibling(graph, norm, made):
                    self._rewrite_norm(graph, norm, x32, step[x], out_step, rng, codes, made)
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)  # a clone's quantizer may sit before its twin's IntNorm
        self.ctx.report["integer-norms"] = dict(self.stats)
        return PassResult(model, modified=True)

    def _node(self, graph, op, inputs, name, before, domain="", **attrs):
        return make_node(graph, op, inputs, origin=self.name, name=name, attributes=attrs, domain=domain,
                         before=before).outputs[0]

    def _input_codes(self, graph, x: ir.Value, s_x: float, codes, before, residual) -> ir.Value:
        """int32 codes of x at step s_x: the sum of its operands' int16 codes, or a QuantizeLinear entry."""
        add = x.producer()
        parts = []
        if add is not None and add.op_type == "Add":
            for v in add.inputs:
                parts.append(codes.get(v) or self._from_requantize(graph, v, s_x, before)
                             or self._rescale(graph, residual.get(v), s_x, before))
        name = x.name or "residual"
        if len(parts) != 2 or any(p is None for p in parts):
            q = self._node(graph, "QuantizeLinear", [x, add_initializer(graph, f"{name}.res_step", np.float32(s_x)),
                                                     add_initializer(graph, f"{name}.res_zp", np.int16(0))],
                           f"{name}.res_q", before)
            q.dtype = ir.DataType.INT16
            self.stats["entries"] += 1
            return self._node(graph, "Cast", [q], f"{name}.res_i32", before, to=ir.DataType.INT32)
        a, b = (self._node(graph, "Cast", [p], f"{name}.res_i32", before, to=ir.DataType.INT32) for p in parts)
        self.stats["integer_adds"] += 1
        return self._node(graph, "Add", [a, b], f"{name}.res_add", before)

    def _rescale(self, graph, src: tuple[ir.Value, float] | None, s_x: float, before) -> ir.Value | None:
        """A pre-norm residual stream: the previous sum's int32 codes (step s) → int16 codes at s_x."""
        if src is None:
            return None
        v, s = src
        b, c, _ = dyadic(np.array([s / s_x]), 30)
        name = v.name or "residual"
        out = self._node(graph, "Requantize", [v, add_initializer(graph, f"{name}.rescale_mult", b.reshape(())),
                                               add_initializer(graph, f"{name}.rescale_shift", c.reshape(())),
                                               add_initializer(graph, f"{name}.rescale_zp", np.int16(0))],
                         f"{name}.rescale", before, domain=DOMAIN)
        out.dtype = ir.DataType.INT16
        self.stats["residual_rescale"] += 1
        return out

    def _from_requantize(self, graph, v: ir.Value, s_x: float, before) -> ir.Value | None:
        dq = v.producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        rq = dq.inputs[0].producer()
        if rq is None or rq.domain != DOMAIN or rq.op_type != "Requantize":
            return None
        b, c, s_o = const_array(rq.inputs[1]), const_array(rq.inputs[2]), const_array(dq.inputs[1])
        if b is None or c is None or s_o is None or s_o.size != 1:
            return None
        m = b.astype(np.float64) / np.exp2(c.astype(np.float64)) * float(s_o.reshape(-1)[0]) / s_x
        b2, c2, _ = dyadic(m, 30, shared_shift=True)
        name = rq.name or "requantize"
        out = self._node(graph, "Requantize", [rq.inputs[0], add_initializer(graph, f"{name}.res_mult", b2),
                                               add_initializer(graph, f"{name}.res_shift", c2),
                                               add_initializer(graph, f"{name}.res_zp", np.int16(0))],
                         f"{name}.residual", rq, domain=DOMAIN)
        out.dtype = ir.DataType.INT16
        self.stats["residual_requantize"] += 1
        return out

    def _from_sibling(self, graph, norm: ir.Node, made: dict) -> bool:
        """A migrate-steps clone (γ' = γ/m, β' = β/m) of a norm already on int16 codes y (step s):
        its quantizer's codes are Requantize(y; s/(m_j·t_j), u_j) — one op instead of a second IntNorm."""
        chain = match_round_and_clip(norm.outputs[0])
        if chain is None or not made or made["op"] != (norm.op_type, str(norm.attributes.get("epsilon"))):
            return False
        if const_array(norm.inputs[1]) is None or (len(norm.inputs) > 2 and norm.inputs[2] is not None
                                                   and const_array(norm.inputs[2]) is None):
            return False
        gamma = const_array(norm.inputs[1]).astype(np.float64)
        beta = const_array(norm.inputs[2]).astype(np.float64) if len(norm.inputs) > 2 and norm.inputs[2] is not None \
            else np.zeros_like(gamma)
        if np.any(gamma == 0) or np.any(made["gamma"] == 0):
            return False
        m = made["gamma"] / gamma
        if np.any(m <= 0) or not np.allclose(beta * m, made["beta"], rtol=1e-6, atol=1e-9):
            return False
        t, u, cast = chain
        b, c, _ = dyadic(made["step"] / (m * np.asarray(t, np.float64)), 30, shared_shift=True)
        name = norm.name or "norm"
        y32 = self._node(graph, "Cast", [made["codes"]], f"{name}.codes_i32", cast, to=ir.DataType.INT32)
        y = self._node(graph, "Requantize", [y32, add_initializer(graph, f"{name}.mult", b),
                                             add_initializer(graph, f"{name}.shift", c),
                                             add_initializer(graph, f"{name}.zp", u)], f"{name}.from_sibling", cast,
                       domain=DOMAIN)
        y.dtype = ir.DataType.UINT8
        cast.outputs[0].replace_all_uses_with(y)
        self.stats["norms_shared"] += 1
        return True

    def _rewrite_norm(self, graph, norm: ir.Node, x32: ir.Value, s_x: float, out_step, rng, codes, made) -> None:
        rms = int(norm.op_type != "LayerNormalization")
        if const_array(norm.inputs[1]) is None or (len(norm.inputs) > 2 and norm.inputs[2] is not None
                                                   and const_array(norm.inputs[2]) is None):
            self.fail("the norm's scale or bias is computed at run time; an integer norm needs constant γ and β",
                      node=norm,
                      hint="use --recipe w8a8-dynamic, or export the model with constant norm weights")
        gamma = const_array(norm.inputs[1]).astype(np.float64)
        beta = const_array(norm.inputs[2]).astype(np.float64) if len(norm.inputs) > 2 and norm.inputs[2] is not None \
            else np.zeros_like(gamma)
        eps = float(norm.attributes["epsilon"].value) if "epsilon" in norm.attributes else 1e-5
        c_len = gamma.shape[-1]
        n_min = max(1, int(np.ceil(eps / s_x ** 2 * (1 if rms else c_len * c_len))))
        out = norm.outputs[0]
        chain = match_round_and_clip(out)
        if chain is not None:  # migrate-steps' quantizer: per-channel steps t, zero points u, uint8
            s_o, zp, sink = chain[0], chain[1], chain[2].outputs[0]
        else:
            s_o = np.float64(out_step.get(out) or (rng[out.name] / I16 or 1.0))
            zp, sink = np.int16(0), None
        fb, c = self.options.frac_bits, self.options.shift
        g = np.round(gamma / s_o * 2.0 ** (c - fb)).astype(np.int64)
        bias = np.round(beta / s_o * 2.0 ** c).astype(np.int64)
        name = norm.name or "norm"
        y = self._node(graph, "IntNorm", [x32, add_initializer(graph, f"{name}.x_zp", np.int32(0)),
                                          add_initializer(graph, f"{name}.g", g),
                                          add_initializer(graph, f"{name}.bias", bias),
                                          add_initializer(graph, f"{name}.zp", np.asarray(zp))],
                       f"{name}.int", norm, domain=DOMAIN, rms=rms, frac_bits=fb, shift=c, n_min=n_min)
        y.dtype = ir.DataType.from_numpy(np.asarray(zp).dtype)
        self.stats["norms"] += 1
        if sink is not None:
            sink.replace_all_uses_with(y)
            return
        codes[out] = y
        made.update(op=(norm.op_type, str(norm.attributes.get("epsilon"))), gamma=gamma, beta=beta, step=float(s_o),
                    codes=y)
        users = [u for u in out.uses() if u.node.op_type != "Add"
                 or not any(w.node.op_type in _NORMS for w in u.node.outputs[0].uses())]
        if users or out in graph.outputs:  # float readers other than a residual add: the integer→float exit
            dq = self._node(graph, "DequantizeLinear", [y, add_initializer(graph, f"{name}.out_step",
                                                                           np.float32(s_o))], f"{name}.out_dq", norm)
            dq.dtype = ir.DataType.FLOAT
            replace_value(graph, out, dq)
            codes[dq] = y
            self.stats["exits"] += 1

