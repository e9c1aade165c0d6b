"""Dynamic per-token activation quantization in front of linear layers (for W4A4 / W4A8).

Per token (row) t = c·max|x| / q_max with q_max = 2^(b−1) − 1 and a clip ratio c ≤ 1 (``clip``), and the linear reads
``clip(round(x / t), −q_max − 1, q_max) · t`` — b-bit integer values times one scale per token.
ONNX has no per-token QuantizeLinear, so the quantizer is written with standard ops (Abs,
ReduceMax, Div, Round, Clip, Mul); one quantizer is shared by all linears that read the same
activation.  ONNX Runtime has no int4×int4 GEMM: the int4 activations are then consumed by
``MatMulNBits`` with ``accuracy_level=4`` (``lower-nbits{accuracy_level=4}``), whose kernel works
on int8 activations — the int8 fallback.  Linears matching ``exclude`` keep float inputs.

``static=true`` (int8 only) instead uses one symmetric step per tensor from calibration,
``step = max|x| / 127``, as a QuantizeLinear/DequantizeLinear pair: static per-tensor int8
activations, where activation outliers cost the most and rotation helps the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.quant.int8 import per_token_round
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node

__all__ = ["QuantizeActs"]


@register_pass("quantize-acts")
class QuantizeActs(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        exclude: str = "lm_head"  # '|'-separated substrings of linear names whose input stays float
        static: bool = False  # per-tensor symmetric steps from calibration (int8 QDQ) instead of per token
        clip: float = 1.0  # per-token range = clip · max|x| (QuaRot clips int4 activations at 0.9)

        def __post_init__(self):
            if self.bits not in (4, 8):
                raise ValueError(f"quantize-acts: bits must be 4 or 8, got {self.bits}")
            if not 0.5 <= self.clip <= 1.0:
                raise ValueError(f"quantize-acts: clip must be in [0.5, 1], got {self.clip}")
            if self.static and self.bits != 8:
                raise ValueError("quantize-acts: static=true is int8 (QuantizeLinear/DequantizeLinear)")

    invalidates_properties = (CALIBRATED, HESSIAN)  # linears now read the quantizers' outputs

    @property
    def requires_properties(self):
        return (CALIBRATED,) if self.options.static else ()

    def call(self, model):
        graph = model.graph
        pats = [p for p in self.options.exclude.split("|") if p]
        done: dict[ir.Value, ir.Value] = {}
        qmax = float(2 ** (self.options.bits - 1) - 1)
        for node in list(graph):
            if node.op_type not in ("MatMul", "MatMul3Bit") or node.inputs[1] is None:
                continue
            w = node.inputs[1]
            weighty = w.const_value is not None or (w.producer() is not None and
                                                    w.producer().op_type == "DequantizeLinear")
            name = node.name or "linear"
            if not weighty or any(p in name for p in pats):
                continue
            x = node.inputs[0]
            if x not in done:
                quantizer = self._static if self.options.static else self._quantizer
                done[x] = quantizer(graph, x, node, name, qmax)
            node.replace_input_with(0, done[x])
            self.stats["linears"] += 1
        self.stats["quantizers"] = len(done)
        graph.meta.pop("lowbit.names", None)
        self.ctx.report["quantize-acts"] = {"bits": self.options.bits, **dict(self.stats)}
        return PassResult(model, modified=bool(done))

    def _static(self, graph, x: ir.Value, before: ir.Node, name: str, qmax: float) -> ir.Value:
        """int8 QDQ with one symmetric step per tensor: ``step = max|x| / 127`` over calibration."""
        from lowbit.quant.stats import act_stats

        stats = act_stats(x)
        if stats is None:
            self.fail(f"static=true needs calibration statistics for the input of '{name}'", node=before,
                      hint="put 'calibrate' before 'quantize-acts'")
        step = np.float32(max(float(stats.absmax.max()), 1e-12) / qmax)
        scale = add_initializer(graph, f"{name}.act_scale", np.array(step, np.float32))
        zero = add_initializer(graph, f"{name}.act_zero_point", np.array(0, np.int8))
        q = make_node(graph, "QuantizeLinear", [x, scale, zero], origin=self.name, name=f"{name}.act_q", before=before)
        return make_node(graph, "DequantizeLinear", [q.outputs[0], scale, zero], origin=self.name,
                         name=f"{name}.act_dq", before=before).outputs[0]

    def _quantizer(self, graph, x: ir.Value, before: ir.Node, name: str, qmax: float) -> ir.Value:
        r, t = per_token_round(graph, x, qmax / self.options.clip, name=name, before=before, origin=self.name)

        def c(suffix, arr):
            return add_initializer(graph, f"{name}.act_{suffix}", arr)

        q = make_node(graph, "Clip", [r, c("lo", np.array(-qmax - 1, np.float32)), c("hi", np.array(qmax, np.float32))],
                      origin=self.name, name=f"{name}.act_clip", before=before).outputs[0]
        return make_node(graph, "Mul", [q, t], origin=self.name, name=f"{name}.act_dequant", before=before).outputs[0]
