"""Quantization-step migration (MergeQuant QSM) for static per-channel activation quantization.

Identity.  Static per-channel uint8 quantization of X (step s_j, zero point z_j per channel) in
front of X·W is ``X·W ≈ (Q(X) − z)·diag(s)·W``, with ``Q(X) = sat(round(X·diag(s)⁻¹) + z)``.  The
step moves out of the run-time quantizer twice:

* ``diag(s)`` into the consumer's weight rows: ``W' = diag(s)·W``, then per-output-channel int8
  ``W' ≈ Wq·diag(s_w)`` — the GEMM ``(Q(X) − z)·Wq`` needs one rescale per output channel (s_w);
* ``diag(s)⁻¹`` into the producer: norm γ and β (a norm whose output also feeds the residual is
  cloned, so the residual keeps the original), or a previous linear's output columns and bias
  (V→O through attention, up→down through the SwiGLU product), as in ``smooth``.

At run time the activation quantizer is ``sat(round(X') + z)``: a plain round-and-clip (emitted as
Round/Add/Clip/Cast, bit-identical to QuantizeLinear with unit scale and much faster in ORT than a
per-axis QuantizeLinear).  Groups with no foldable producer (e.g. GELU→FFN2) multiply by 1/s
first (exact: s is a power of two); their weights carry s all the same.

Balancing (the conditioning of diag(s)).  Per-channel steps a_j = range_j / 255 span orders of
magnitude; folding them into W's rows makes row norms span the same ratio, and per-output-channel
weight quantization then spends its range on the large rows.  Steps are therefore balanced as
``s_j = 2^⌈log2 max(a_j, max(a)/ρ)⌉``: at most ρ between the largest and the smallest step (a
bounded condition number, like MergeQuant's adaptive clipping of the step range), with ρ chosen
per group from {1, 2, 4, …, 2^10} by the W8A8 output error on calibration rows (ρ = 1 is the
per-tensor quantizer, so the search never does worse than it on those rows).  Steps are powers
of two: scaling by 2^k is exact in float, so γ/s, β/s, W/s and X/s are computed without
rounding and the migrated graph's integer tensors equal the unmigrated graph's bit for bit
(``migrate=false`` builds the latter: same steps, kept in the quantizers).

Headroom (``margin`` m ≥ 1).  Static ranges saturate on text unlike the calibration's: SmolLM2's
calibration sequences each start with BOS, the evaluation windows start anywhere, and the first
position's large activations then exceed the calibrated ranges (benchmarks/INTEGER_RESULTS.md).
``margin`` widens every calibrated range [lo, hi] to [m·lo, m·hi] before the steps are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import NORM_INPUTS, Group, find_groups
from lowbit.quant.stats import act_stats
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, ensure_opset, make_node, set_input_const

from lowbit.quant.int8 import match_round_and_clip, quantize_weight_int8

__all__ = ["MigrateSteps", "balanced_steps", "channel_qparams"]


def balanced_steps(a: np.ndarray, ratio: float) -> np.ndarray:
    """Power-of-two steps ≥ a, with max/min ≤ 2·ratio (the ceil can add one factor of 2)."""
    a = np.asarray(a, np.float64)
    top = float(a.max()) if a.size and a.max() > 0 else 1.0
    return np.exp2(np.ceil(np.log2(np.maximum(a, top / ratio))))


def channel_qparams(lo: np.ndarray, hi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """uint8 zero points for per-channel ranges [lo, hi] at steps s."""
    lo = np.minimum(lo, 0.0)
    return np.clip(np.round(-lo / s), 0, 255).astype(np.uint8)


def _error(rows: np.ndarray, weights: list[np.ndarray], s: np.ndarray, z: np.ndarray,
           refs: list[np.ndarray] | None = None) -> float:
    """Σ over the consumers of ‖rows·W − DQ(Q(rows))·DQ(Q(diag(s)·W))‖² (``refs``: the rows·W, if known)."""
    xq = np.clip(np.round(rows / s) + z, 0, 255) - z
    err = 0.0
    for i, w in enumerate(weights):
        wq, sw = quantize_weight_int8((w * s[:, None]).astype(np.float32))
        ref = refs[i] if refs is not None else rows @ w
        err += float(np.sum((ref - (xq @ wq.astype(np.float64)) * sw) ** 2))
    return err


@register_pass("migrate-steps")
class MigrateSteps(Pass):
    @dataclass(frozen=True)
    class Options:
        migrate: bool = True  # false: keep the steps in the quantizers (the unmigrated reference graph)
        ratio: int = 0  # max step ratio ρ (a power of two); 0 = search per group on calibration rows
        clone_norms: bool = True  # clone a norm whose output also feeds non-linears
        margin: float = 1.0  # calibrated ranges widened by this factor (headroom for text unlike the calibration's)

        def __post_init__(self):
            if self.ratio < 0 or (self.ratio and self.ratio & (self.ratio - 1)):
                raise ValueError(f"migrate-steps: ratio must be 0 (search) or a power of two, got {self.ratio}")
            if not 1.0 <= self.margin <= 16.0:
                raise ValueError(f"migrate-steps: margin must be in [1, 16], got {self.margin}")

    requires_properties = (CALIBRATED,)
    ensures_properties = (QUANTIZED,)
    invalidates_properties = (CALIBRATED, HESSIAN)  # linears read the new quantizers

    def _steps(self, group: Group) -> tuple[np.ndarray, np.ndarray]:
        st = act_stats(group.activation)
        if st is None:
            self.fail(f"no calibration statistics for '{group.activation.name}'", node=group.consumers[0].node,
                      hint="run 'calibrate' right before 'migrate-steps'")
        lo, hi = np.minimum(st.cmin, 0).astype(np.float64), np.maximum(st.cmax, 0).astype(np.float64)
        lo, hi = lo * self.options.margin, hi * self.options.margin
        a = np.maximum((hi - lo) / 255.0, 1e-30)
        if group.kind == "linear":  # GQA: channels of one V channel share a step
            n = group.producer_linear.shape[1]
            ap = np.zeros(n)
            np.maximum.at(ap, group.channel_map, a)
            a = ap[group.channel_map]
        ratios = [self.options.ratio] if self.options.ratio else [2 ** k for k in range(11)]
        if len(ratios) == 1 or st.rows is None:
            s = balanced_steps(a, ratios[0] if self.options.ratio else 16)
            return s, channel_qparams(lo, hi, s)
        rows = st.rows.astype(np.float64)
        weights = [c.weight.const_value.numpy().astype(np.float64) for c in group.consumers]
        refs = [rows @ w for w in weights]  # the float products do not depend on the ratio
        best, seen = None, set()
        for r in ratios:
            s = balanced_steps(a, r)
            if s.tobytes() in seen:  # ρ above the steps' own spread: the same steps as a smaller ρ
                continue
            seen.add(s.tobytes())
            z = channel_qparams(lo, hi, s)
            e = _error(rows, weights, s, z, refs)
            if best is None or e < best[0]:
                best = (e, s, z, r)
        self.ratios.append(best[3])
        return best[1], best[2]

    def _fold_producer(self, graph: ir.Graph, group: Group, s: np.ndarray) -> ir.Value | None:
        """Fold 1/s into the producer; returns the value the quantizer reads (x / s), or None."""
        inv = (1.0 / s).astype(np.float32)
        if group.kind == "norm" or (group.kind == "none" and self.options.clone_norms and
                                    (p := group.activation.producer()) is not None and
                                    p.op_type in ("LayerNormalization", "RMSNormalization")):
            norm = group.producer or group.activation.producer()
            if group.kind == "none":  # clone the norm for the linears; the residual keeps the original
                attrs = {k: a for k, a in norm.attributes.items()}
                clone = make_node(graph, norm.op_type, list(norm.inputs), origin=self.name,
                                  name=f"{norm.name}.migrated", attributes=attrs, before=norm)
                if group.activation.dtype is not None:  # an untyped model stays untyped (no Tensor(None))
                    clone.outputs[0].dtype, clone.outputs[0].shape = group.activation.dtype, group.activation.shape
                norm = clone
            for idx in NORM_INPUTS.get(norm.op_type, (1, 2)):  # γ, β (Skip norms: inputs 2, 3)
                if idx is not None and idx < len(norm.inputs) and norm.inputs[idx] is not None:
                    if norm.inputs[idx].const_value is None:
                        self.fail("norm scale is not a constant", node=norm)
                    set_input_const(graph, norm, idx, norm.inputs[idx].const_value.numpy() * inv)
            self.stats["migrated_norm" if group.kind == "norm" else "migrated_cloned_norm"] += 1
            return norm.outputs[0]
        if group.kind == "linear":
            prev = group.producer_linear
            if np.unique(group.channel_map).size < prev.shape[1]:  # a fused producer (gate_up, qkv): its output
                # leaves as one tensor for both halves; steps in the up half raised a tiny Phi-3's error 0.12 → 0.20
                self.stats["kept_fused_producer"] += 1
                return None
            sp = np.ones(prev.shape[1])
            sp[group.channel_map] = s
            w = prev.weight.const_value.numpy()
            set_input_const(graph, prev.node, 1, w / sp[None, :].astype(w.dtype))
            if prev.bias is not None:
                idx = list(prev.bias_node.inputs).index(prev.bias)
                set_input_const(graph, prev.bias_node, idx, prev.bias.const_value.numpy() / sp.astype(np.float32))
            self.stats["migrated_linear"] += 1
            return group.activation
        return None

    def call(self, model):
        graph = model.graph
        ensure_opset(model, 13, "per-channel QDQ")
        self.ratios: list[int] = []
        plans = []
        for group in find_groups(graph):  # phase 1: steps, producer folds (all on float weights)
            s, z = self._steps(group)
            src = self._fold_producer(graph, group, s) if self.options.migrate else None
            if src is None:
                self.stats["kept_in_quantizer"] += 1
            plans.append((group, s, z, src))
        for group, s, z, src in plans:  # phase 2: quantizers and int8 weights (weights as folded)
            c = s.shape[0]
            qscale = np.ones(c, np.float32) if src is not None else s.astype(np.float32)
            x = src if src is not None else group.activation
            base = group.activation.name or group.consumers[0].name
            first = group.consumers[0].node
            zp = add_initializer(graph, f"{base}.act_zero_point", z)
            one = add_initializer(graph, f"{base}.act_unit", np.ones(c, np.float32))
            if self.options.migrate:
                xq = self._round_and_clip(graph, x, None if src is not None else 1.0 / s, z, base, first)
            else:  # the reference form: a standard per-channel QuantizeLinear carrying the steps
                q_s = add_initializer(graph, f"{base}.act_step", qscale)
                xq = make_node(graph, "QuantizeLinear", [x, q_s, zp], origin=self.name, name=f"{base}.act_q",
                               attributes={"axis": -1}, before=first).outputs[0]
            dq = make_node(graph, "DequantizeLinear", [xq, one, zp], origin=self.name,
                           name=f"{base}.act_dq", attributes={"axis": -1}, before=first)
            for lin in group.consumers:
                w = lin.node.inputs[1].const_value.numpy()
                wq, sw = quantize_weight_int8((w * s[:, None].astype(np.float32)).astype(np.float32), lin.name)
                wq_v = add_initializer(graph, f"{lin.name}.weight_q", wq)
                sw_v = add_initializer(graph, f"{lin.name}.weight_scale", sw)
                dqw = make_node(graph, "DequantizeLinear", [wq_v, sw_v], origin=self.name,
                                name=f"{lin.name}.weight_dq", attributes={"axis": 1}, before=lin.node)
                lin.node.replace_input_with(1, dqw.outputs[0])
                lin.node.replace_input_with(0, dq.outputs[0])
                self.stats["linears"] += 1
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass  # noqa: I001

        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        rep = {"linears": self.stats["linears"], "migrated": sum(v for k, v in self.stats.items()
                                                                 if k.startswith("migrated")),
               "kept_in_quantizer": self.stats["kept_in_quantizer"]}
        if self.ratios:
            rep["ratio"] = {"min": min(self.ratios), "median": float(np.median(self.ratios)), "max": max(self.ratios)}
        self.ctx.report["migrate-steps"] = rep
        return PassResult(model, modified=True)

    def _round_and_clip(self, graph, x, inv_step, z, base, before) -> ir.Value:
        """sat(round(x·inv_step) + z) as Round/Add/Clip/Cast: equal to QuantizeLinear(x, 1/inv_step, z) bit for
        bit (inv_step is a power of two, so the product is exact), and 10-20× faster in ORT than a
        per-axis QuantizeLinear."""
        def node(op, ins, suffix, **attrs):
            return make_node(graph, op, ins, origin=self.name, name=f"{base}.{suffix}", attributes=attrs,
                             before=before).outputs[0]

        if inv_step is not None:
            x = node("Mul", [x, add_initializer(graph, f"{base}.act_inv_step", inv_step.astype(np.float32))],
                     "act_scale")
        r = node("Add", [node("Round", [x], "act_round"),
                         add_initializer(graph, f"{base}.act_zero_point_f", z.astype(np.float32))], "act_offset")
        clipped = node("Clip", [r, add_initializer(graph, f"{base}.act_qmin", np.float32(0)),
                                add_initializer(graph, f"{base}.act_qmax", np.float32(255))], "act_clip")
        out = node("Cast", [clipped], "act_q", to=ir.DataType.UINT8)
        out.dtype = ir.DataType.UINT8
        return out
