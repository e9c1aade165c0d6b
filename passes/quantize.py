"""W8A8 quantization of linear layers, materialised as QDQ (and integer ops for per-token).

Weights: per output channel, symmetric int8 in [-127, 127]: ``W ≈ s_w[n] · Wq[:, n]``,
``s_w = max|W[:, n]| / 127``; stored as an int8 initializer behind ``DequantizeLinear(axis=1)``.

Activations, ``acts=8``:

* ``mode=static`` (per tensor, from calibration): asymmetric uint8,
  ``step = (max(hi,0) − min(lo,0)) / 255``, ``zp = round(−lo/step)``; one QuantizeLinear →
  DequantizeLinear pair per activation, shared by every linear that reads it.  ORT fuses
  ``Q→DQ(u8)·DQ(s8 per-channel)→MatMul`` into ``MatMulIntegerToFloat`` (u8×s8 integer GEMM).
* ``mode=dynamic`` (per token): ``t = max|x_row| / 127``; ``q = round(x/t) + 128`` as uint8;
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

from lowbit.analysis import Linear, find_linears
from lowbit.calibration import act_stats
from lowbit.errors import InvalidWeightsError, UnsupportedModelError
from lowbit.passmanager import CALIBRATED, QUANTIZED, Pass, PassResult, register_pass
from lowbit.rewrite import add_initializer, ensure_opset, make_node, replace_uses_in

__all__ = ["Quantize", "quantize_weight_int8", "static_act_params"]


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


def static_act_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    step = (hi - lo) / 255.0
    if step == 0:
        step = 1.0  # the activation is all zeros: any step is exact
    zp = int(np.clip(np.round(-lo / step), 0, 255))
    return np.float32(step), np.uint8(zp)


@register_pass("quantize")
class Quantize(Pass):
    @dataclass(frozen=True)
    class Options:
        weights: int = 8
        acts: int = 8
        mode: Literal["static", "dynamic"] = "static"
        percentile: float = 100.0  # static range clip; <100 needs calibrate{percentiles=true}
        exclude: str = ""

        def __post_init__(self):
            if self.weights != 8:
                raise ValueError(f"quantize: weights={self.weights} is not supported yet (8)")
            if self.acts not in (8, 16):
                raise ValueError(f"quantize: acts must be 8 or 16 (float), got {self.acts}")
            if self.mode not in ("static", "dynamic"):
                raise ValueError(f"quantize: mode must be static or dynamic, got {self.mode}")
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError(f"quantize: percentile must be in (50, 100], got {self.percentile}")

    ensures_properties = (QUANTIZED,)

    def _excluded(self, lin: Linear) -> bool:
        pats = [p for p in self.options.exclude.split("|") if p]
        return any(p in lin.name for p in pats)

    def call(self, model):
        graph = model.graph
        ensure_opset(model, 13, "per-channel QDQ")
        static = self.options.acts == 8 and self.options.mode == "static"
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
        act_qdq: dict[ir.Value, ir.Value] = {}
        for lin in linears:
            w = lin.weight.const_value.numpy()
            wq, sw = quantize_weight_int8(w, lin.name)
            del w
            if isinstance(lin.weight.const_value, ir.ExternalTensor):
                lin.weight.const_value.release()  # layer by layer: the float weight leaves memory
            if self.options.acts == 8 and self.options.mode == "dynamic":
                self._dynamic(graph, lin, wq, sw)
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
        producer = lin.input.producer()
        q = make_node(graph, "QuantizeLinear", [lin.input, s_v, z_v], origin=self.name, name=f"{base}.act_q",
                      before=lin.node)
        dq = make_node(graph, "DequantizeLinear", [q.outputs[0], s_v, z_v], origin=self.name,
                       name=f"{base}.act_dq", before=lin.node)
        del producer
        return dq.outputs[0]

    def _dynamic(self, graph: ir.Graph, lin: Linear, wq: np.ndarray, sw: np.ndarray) -> None:
        ensure_opset_18 = graph.opset_imports.get("", 1) >= 18
        name, x, at = lin.name, lin.input, lin.node
        o = self.name

        def node(op, inputs, suffix, **attrs):
            return make_node(graph, op, inputs, origin=o, name=f"{name}.{suffix}", attributes=attrs,
                             before=at).outputs[0]

        c = lambda suffix, arr: add_initializer(graph, f"{name}.{suffix}", arr)  # noqa: E731
        absx = node("Abs", [x], "act_abs")
        if ensure_opset_18:
            amax = node("ReduceMax", [absx, c("axes", np.array([-1], np.int64))], "act_absmax", keepdims=1)
        else:
            amax = node("ReduceMax", [absx], "act_absmax", axes=[-1], keepdims=1)
        t = node("Div", [node("Max", [amax, c("eps", np.array(1e-12, np.float32))], "act_floor"),
                         c("qmax", np.array(127.0, np.float32))], "act_step")
        r = node("Round", [node("Div", [x, t], "act_scaled")], "act_round")
        shifted = node("Add", [r, c("offset", np.array(128.0, np.float32))], "act_offset")
        clipped = node("Clip", [shifted, c("lo", np.array(0.0, np.float32)), c("hi", np.array(255.0, np.float32))],
                       "act_clip")
        q = node("Cast", [clipped], "act_u8", to=ir.DataType.UINT8)
        acc = node("MatMulInteger", [q, c("weight_q", wq), c("act_zero_point", np.array(128, np.uint8))], "matmul_int")
        y = node("Mul", [node("Mul", [node("Cast", [acc], "acc_f32", to=ir.DataType.FLOAT), t], "rescale_token"),
                         c("weight_scale", sw)], "rescale_channel")
        out = lin.node.outputs[0]
        replace_uses_in([u.node for u in out.uses()], out, y)
        if out in graph.outputs:
            graph.outputs[graph.outputs.index(out)] = y
            y.name, out.name = out.name, f"{out.name}_float"
            y.type, y.shape = out.type, out.shape  # a graph output needs its type
