"""W8A8 quantization of linear layers, materialised as QDQ (and integer ops for per-token).

Weights: per output channel, symmetric int8 in [-127, 127]: ``W ≈ s_w[n] · Wq[:, n]``,
``s_w = max|W[:, n]| / 127``; stored as an int8 initializer behind ``DequantizeLinear(axis=1)``.

Activations, ``acts=8``:

* ``mode=static`` (per tensor, from calibration): asymmetric uint8,
  ``step = (max(hi,0) − min(lo,0)) / 255``, ``zp = round(−lo/step)``; one QuantizeLinear →
  DequantizeLinear pair per activation, shared by every linear that reads it.  ORT fuses
  ``Q→DQ(u8)·DQ(s8 per-channel)→MatMul`` into ``MatMulIntegerToFloat`` (u8×s8 integer GEMM).
* ``mode=dynamic-tensor`` (per tensor, at run time): ``DynamicQuantizeLinear`` (uint8) shared per
  activation, ``MatMulInteger``, one float rescale: the form ORT fuses into ``DynamicQuantizeMatMul``.
* ``mode=dynamic`` (per token): ``t = max|x_row| / 127``; ``q = round(x/t) + 128`` as uint8 (computed once per activation);
  ``MatMulInteger(q, Wq, a_zero_point=128)`` (u8×s8, int32 accumulator) × t × s_w.  ONNX has no
  per-token QuantizeLinear, so this mode is emitted directly as integer ops.

``acts=16`` leaves activations in float (weight-only int8).  Linears whose name matches
``exclude`` (a substring, ``|``-separated) stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import Linear, find_linears
from lowbit.quant.stats import act_stats
from lowbit.errors import InvalidWeightsError, UnsupportedModelError
from lowbit.passmanager.manager import CALIBRATED, QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, ensure_opset, make_node, replace_value
from lowbit.quant.int8 import per_token_round, quantize_weight_int8, static_act_params

__all__ = ["Quantize"]


@register_pass("quantize")
class Quantize(Pass):
    @dataclass(frozen=True)
    class Options:
        weights: int = 8
        acts: int = 8
        mode: Literal["static", "dynamic", "dynamic-tensor"] = "static"
        percentile: float = 100.0  # static range clip; <100 needs calibrate{percentiles=true}
        exclude: str = ""

        def __post_init__(self):
            if self.weights != 8:
                raise ValueError(f"quantize: weights={self.weights} is not supported yet (8)")
            if self.acts not in (8, 16):
                raise ValueError(f"quantize: acts must be 8 or 16 (float), got {self.acts}")
            if self.mode not in ("static", "dynamic", "dynamic-tensor"):
                raise ValueError(f"quantize: mode must be static, dynamic or dynamic-tensor, got {self.mode}")
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError(f"quantize: percentile must be in (50, 100], got {self.percentile}")

    ensures_properties = (QUANTIZED,)

    @property
    def requires_properties(self):
        return (CALIBRATED,) if self.options.acts == 8 and self.options.mode == "static" else ()

    def _excluded(self, lin: Linear) -> bool:
        pats = [p for p in self.options.exclude.split("|") if p]
        return any(p in lin.name for p in pats)

    def call(self, model):
        graph = model.graph
        ensure_opset(model, 13, "per-channel QDQ")
        static = self.options.acts == 8 and self.options.mode == "static"
        if self.options.acts == 8 and self.options.mode == "dynamic":
            ensure_opset(model, 18, "per-token dynamic quantization (ReduceMax with axes input)")
        if static and CALIBRATED not in self.ctx.properties:
            self.fail("static activation quantization needs calibration statistics",
                      hint="put 'calibrate' before 'quantize', or use mode=dynamic")
        found = find_linears(graph)
        if not found:
            self.fail("the model has no linear layer to quantize (MatMul with a constant 2-D weight)",
                      hint="run 'lowbit inspect MODEL'; weights fed as graph inputs or made by Constant nodes "
                           "are not recognised")
        linears = [lin for lin in found if not self._excluded(lin)]
        self.stats["excluded"] = len(found) - len(linears)
        act_qdq: dict[ir.Value, object] = {}  # one activation quantizer per activation
        for lin in linears:
            w = lin.weight.const_value.numpy()
            wq, sw = quantize_weight_int8(w, lin.name)
            del w
            if isinstance(lin.weight.const_value, ir.ExternalTensor):
                lin.weight.const_value.release()  # layer by layer: the float weight leaves memory
            if self.options.acts == 8 and self.options.mode == "dynamic":
                if lin.input not in act_qdq:
                    act_qdq[lin.input] = self._dynamic_act(graph, lin)
                self._dynamic(graph, lin, *act_qdq[lin.input], wq, sw)
            elif self.options.acts == 8 and self.options.mode == "dynamic-tensor":
                if lin.input not in act_qdq:
                    act_qdq[lin.input] = make_node(graph, "DynamicQuantizeLinear", [lin.input], origin=self.name,
                                                   name=f"{lin.input.name or lin.name}.act_dq", num_outputs=3,
                                                   before=lin.node).outputs
                self._dynamic_tensor(graph, lin, act_qdq[lin.input], wq, sw)
            else:
                wq_v = add_initializer(graph, f"{lin.name}.weight_q", wq)
                sw_v = add_initializer(graph, f"{lin.name}.weight_scale", sw)
                dq = make_node(graph, "DequantizeLinear", [wq_v, sw_v], origin=self.name,
                               name=f"{lin.name}.weight_dq", attributes={"axis": 1}, before=lin.node)
                lin.node.replace_input_with(1, dq.outputs[0])
                if static:
                    if lin.input not in act_qdq:
                        act_qdq[lin.input] = self._act_qdq(graph, lin)
                    lin.node.replace_input_with(0, act_qdq[lin.input])
            self.stats["linears"] += 1
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        self.ctx.report["quantize"] = {"linears": self.stats["linears"], "activations": len(act_qdq),
                                       "mode": self.options.mode if self.options.acts == 8 else "weight-only"}
        return PassResult(model, modified=True)

    def _act_qdq(self, graph: ir.Graph, lin: Linear) -> ir.Value:
        stats = act_stats(lin.input)
        if stats is None:
            self.fail(f"no calibration statistics for the input of '{lin.name}'", node=lin.node,
                      hint="run 'calibrate' right before 'quantize' (passes in between may have replaced it)")
        pct = None if self.options.percentile >= 100.0 else self.options.percentile
        if pct is not None and stats.sample is None:
            self.fail("percentile ranges need calibrate{percentiles=true} after the last smooth", node=lin.node)
        step, zp = static_act_params(*stats.tensor_range(pct))
        base = lin.input.name or lin.name
        s_v = add_initializer(graph, f"{base}.act_scale", np.array(step, np.float32))
        z_v = add_initializer(graph, f"{base}.act_zero_point", np.array(zp, np.uint8))
        q = make_node(graph, "QuantizeLinear", [lin.input, s_v, z_v], origin=self.name, name=f"{base}.act_q",
                      before=lin.node)
        dq = make_node(graph, "DequantizeLinear", [q.outputs[0], s_v, z_v], origin=self.name,
                       name=f"{base}.act_dq", before=lin.node)
        return dq.outputs[0]

    def _dynamic_act(self, graph: ir.Graph, lin: Linear) -> tuple[ir.Value, ir.Value]:
        """Per-token uint8 codes (zero point 128) and steps of ``lin``'s input, shared by its group.

        ``|x / t| <= 127`` by construction of ``t = max|x_row| / 127``, so no clip is needed.
        """
        name = lin.input.name or lin.name
        r, t = per_token_round(graph, lin.input, 127.0, name=name, before=lin.node, origin=self.name)
        offset = add_initializer(graph, f"{name}.act_offset_value", np.array(128.0, np.float32))
        shifted = make_node(graph, "Add", [r, offset], origin=self.name, name=f"{name}.act_offset",
                            before=lin.node).outputs[0]
        q = make_node(graph, "Cast", [shifted], origin=self.name, name=f"{name}.act_u8",
                      attributes={"to": ir.DataType.UINT8}, before=lin.node).outputs[0]
        return q, t

    def _dynamic_tensor(self, graph: ir.Graph, lin: Linear, act, wq: np.ndarray, sw: np.ndarray) -> None:
        """``DynamicQuantizeLinear`` → ``MatMulInteger`` → Cast → Mul: ORT fuses it into DynamicQuantizeMatMul."""
        q, scale, zp = act

        def node(op, inputs, suffix, **attrs):
            return make_node(graph, op, inputs, origin=self.name, name=f"{lin.name}.{suffix}", attributes=attrs,
                             before=lin.node).outputs[0]

        w_zp = add_initializer(graph, f"{lin.name}.weight_zero_point", np.zeros(wq.shape[1], np.int8))
        acc = node("MatMulInteger", [q, add_initializer(graph, f"{lin.name}.weight_q", wq), zp, w_zp], "matmul_int")
        both = node("Mul", [scale, add_initializer(graph, f"{lin.name}.weight_scale", sw)], "scales")
        y = node("Mul", [node("Cast", [acc], "acc_f32", to=ir.DataType.FLOAT), both], "rescale")
        replace_value(graph, lin.node.outputs[0], y)

    def _dynamic(self, graph: ir.Graph, lin: Linear, q: ir.Value, t: ir.Value, wq: np.ndarray,
                 sw: np.ndarray) -> None:
        name = lin.name

        def node(op, inputs, suffix, **attrs):
            return make_node(graph, op, inputs, origin=self.name, name=f"{name}.{suffix}", attributes=attrs,
                             before=lin.node).outputs[0]

        def const(suffix, arr):
            return add_initializer(graph, f"{name}.{suffix}", arr)

        acc = node("MatMulInteger", [q, const("weight_q", wq), const("act_zero_point", np.array(128, np.uint8))],
                   "matmul_int")
        y = node("Mul", [node("Mul", [node("Cast", [acc], "acc_f32", to=ir.DataType.FLOAT), t], "rescale_token"),
                         const("weight_scale", sw)], "rescale_channel")
        replace_value(graph, lin.node.outputs[0], y)
