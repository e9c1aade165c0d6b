"""Dynamic per-token activation quantization in front of linear layers (for W4A4 / W4A8).

Per token (row) t = max|x| / q_max with q_max = 2^(b−1) − 1, and the linear reads
``clip(round(x / t), −q_max − 1, q_max) · t`` — b-bit integer values times one scale per token.
ONNX has no per-token QuantizeLinear, so the quantizer is written with standard ops (Abs,
ReduceMax, Div, Round, Clip, Mul); one quantizer is shared by all linears that read the same
activation.  ONNX Runtime has no int4×int4 GEMM: the int4 activations are then consumed by
``MatMulNBits`` with ``accuracy_level=4`` (``lower-nbits{accuracy_level=4}``), whose kernel works
on int8 activations — the int8 fallback.  Linears matching ``exclude`` keep float inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.analysis import find_linears
from lowbit.passmanager import Pass, PassResult, register_pass
from lowbit.rewrite import add_initializer, make_node

__all__ = ["QuantizeActs", "fake_quant_per_token"]


def fake_quant_per_token(x: np.ndarray, bits: int) -> np.ndarray:
    """The numpy reference of what the inserted ops compute."""
    qmax = float(2 ** (bits - 1) - 1)
    t = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / qmax
    return (np.clip(np.round(x / t), -qmax - 1, qmax) * t).astype(np.float32)


@register_pass("quantize-acts")
class QuantizeActs(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        exclude: str = "lm_head"  # '|'-separated substrings of linear names whose input stays float

        def __post_init__(self):
            if self.bits not in (4, 8):
                raise ValueError(f"quantize-acts: bits must be 4 or 8, got {self.bits}")

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
                done[x] = self._quantizer(graph, x, node, name, qmax)
            node.replace_input_with(0, done[x])
            self.stats["linears"] += 1
        self.stats["quantizers"] = len(done)
        graph.meta.pop("lowbit.names", None)
        self.ctx.report["quantize-acts"] = {"bits": self.options.bits, **dict(self.stats)}
        return PassResult(model, modified=bool(done))

    def _quantizer(self, graph, x: ir.Value, before: ir.Node, name: str, qmax: float) -> ir.Value:
        o = self.name
        at = before  # the first linear reading x in graph order

        def node(op, inputs, suffix, **attrs):
            return make_node(graph, op, inputs, origin=o, name=f"{name}.act_{suffix}", attributes=attrs,
                             before=at).outputs[0]

        def c(suffix, arr):
            return add_initializer(graph, f"{name}.act_{suffix}", arr)

        amax = node("ReduceMax", [node("Abs", [x], "abs"), c("axes", np.array([-1], np.int64))], "absmax",
                    keepdims=1)
        t = node("Div", [node("Max", [amax, c("eps", np.array(1e-12, np.float32))], "floor"),
                         c("qmax", np.array(qmax, np.float32))], "step")
        r = node("Round", [node("Div", [x, t], "scaled")], "round")
        q = node("Clip", [r, c("lo", np.array(-qmax - 1, np.float32)), c("hi", np.array(qmax, np.float32))], "clip")
        return node("Mul", [q, t], "dequant")
