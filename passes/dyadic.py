"""Dyadic integer-only rescaling (HAWQ-V3): float rescales between integer tensors → b·x >> c.

Input: a quantized linear in QDQ form, ``MatMul(DQ(xq; 1 or σ, z), DQ(Wq; s_w, axis=1)) [+ bias]``
(as ``migrate-steps`` or ``quantize{mode=static}`` emit it).  Identity, per output channel n::

    y_n = σ·s_w[n] · (Σ_c (xq_c − z_c)·Wq[c,n] + β_n),      β_n = round(bias_n / (σ·s_w[n]))
        = σ·s_w[n] · (acc_n + k_n),   acc = MatMulInteger(xq, Wq),  k_n = β_n − Σ_c z_c·Wq[c,n]

and the output is requantized to the next integer tensor with step s_o and zero point z_o:
``yq_n = sat(round(m_n·(acc_n + k_n)) + z_o)``, m_n = σ·s_w[n]/s_o ≈ b_n / 2^c_n (``dyadic``,
b with ``mult_bits`` significant bits), i.e. ``lowbit.Requantize(acc + k, b, c, z_o)``.  The
graph then reads ``DQ(yq; s_o, z_o)`` — the float boundary — where float ops follow.

Overflow proof (checked per output channel, the pass refuses otherwise): with x ∈ [0, 255]
(uint8) and |Wq| ≤ 127, |acc_n| ≤ 255·Σ_c|Wq[c,n]| =: A_n ≤ 255·127·K, and |acc_n + k_n| ≤ A_n + |k_n|.
Both must stay ≤ 2^31 − 1 (int32), which holds for any weights when K ≤ 66 000 and is checked on
the actual weights.  Then |(acc + k)·b| < 2^31·2^30 = 2^61, inside the int64 the ORT lowering of
Requantize uses (it offsets by 2^62).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import const_array
from lowbit.ops.registry import DOMAIN, VERSION
from lowbit.ops.integer_ops import dyadic
from lowbit.quant.stats import collect_stats
from lowbit.passmanager.manager import QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

__all__ = ["Dyadic", "accumulator_bound"]

INT32_MAX = 2 ** 31 - 1


def accumulator_bound(wq: np.ndarray, k: np.ndarray, xmax: int) -> np.ndarray:
    """Per output channel: the largest |acc + k| any input in [0, xmax] can produce."""
    return xmax * np.abs(wq.astype(np.int64)).sum(axis=0) + np.abs(k.astype(np.int64))


@dataclass
class _Site:
    matmul: ir.Node
    xq: ir.Value
    a_scale: np.ndarray
    a_zp: np.ndarray
    wq: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    out: ir.Value  # the float output the rest of the graph reads
    name: str


def _match(node: ir.Node, graph: ir.Graph) -> _Site | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    da, dw = (v.producer() if v is not None else None for v in node.inputs)
    if da is None or dw is None or da.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
        return None
    wq, sw = const_array(dw.inputs[0]), const_array(dw.inputs[1])
    sa = const_array(da.inputs[1])
    za = const_array(da.inputs[2]) if len(da.inputs) > 2 else None
    if wq is None or sw is None or sa is None or wq.dtype != np.int8 or wq.ndim != 2:
        return None
    if len(dw.inputs) > 2 and dw.inputs[2] is not None and np.any(const_array(dw.inputs[2]) != 0):
        return None
    if da.inputs[0].dtype not in (None, ir.DataType.UINT8) and (da.inputs[0].producer() is None or
                                                                 da.inputs[0].producer().op_type != "QuantizeLinear"):
        return None
    za = np.zeros((), np.uint8) if za is None else za
    if za.dtype != np.uint8:
        return None
    out, bias = node.outputs[0], None
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and out not in graph.outputs:
        add = uses[0].node
        b = const_array(add.inputs[1 - uses[0].idx])
        if b is not None and b.ndim == 1 and b.shape[0] == wq.shape[1]:
            bias, out = b, add.outputs[0]
    return _Site(node, da.inputs[0], sa, za, wq, sw, bias, out, node.name or out.name)


@register_pass("dyadic")
class Dyadic(Pass):
    @dataclass(frozen=True)
    class Options:
        out_bits: int = 8  # requantized output: uint8 (8) or int16 (16)
        mult_bits: int = 30  # significant bits of the multiplier b (≤ 30: the int64 proof needs it)
        shared_shift: bool = True  # one shift c per tensor (b per channel): shorter ORT body

        def __post_init__(self):
            if self.out_bits not in (8, 16):
                raise ValueError(f"dyadic: out_bits must be 8 or 16, got {self.out_bits}")
            if not 8 <= self.mult_bits <= 30:
                raise ValueError(f"dyadic: mult_bits must be in [8, 30], got {self.mult_bits}")

    requires_properties = (QUANTIZED,)

    def _out_qparams(self, lo: float, hi: float) -> tuple[float, np.ndarray]:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.options.out_bits == 8:
            step = (hi - lo) / 255.0 or 1.0
            return step, np.asarray(np.clip(np.round(-lo / step), 0, 255), np.uint8)
        step = (hi - lo) / 65535.0 or 1.0
        return step, np.asarray(np.clip(np.round(-lo / step) - 32768, -32768, 32767), np.int16)

    def call(self, model):
        graph = model.graph
        sites = [s for n in list(graph) if (s := _match(n, graph)) is not None]
        if not sites:
            self.fail("no quantized linear in QDQ form", hint="run 'migrate-steps' or 'quantize{mode=static}' first")
        feeds = self.ctx.calibration
        if not feeds:
            self.fail("output ranges need calibration samples", hint="pass calibration=... / --calibration")
        inner = [s.out for s in sites if s.out not in graph.outputs]
        stats = collect_stats(model, inner, feeds, progress=self.ctx.show_progress)
        model.opset_imports[DOMAIN] = VERSION
        worst_err, worst_bound, shifts = 0.0, 0, []
        for site in sites:
            if site.a_scale.size != 1 and np.ptp(site.a_scale) != 0:
                self.fail("per-channel activation steps are still in the dequantizer", node=site.matmul,
                          hint="run 'migrate-steps' (it moves them into the weights)")
            sigma = float(site.a_scale.reshape(-1)[0])
            real = sigma * site.w_scale.astype(np.float64)
            k = -(np.broadcast_to(site.a_zp.astype(np.int64), (site.wq.shape[0],)) @ site.wq.astype(np.int64))
            if site.bias is not None:
                k = k + np.round(site.bias.astype(np.float64) / real).astype(np.int64)
            bound = accumulator_bound(site.wq, k, 255)
            if bound.max() > INT32_MAX:
                n = int(bound.argmax())
                self.fail(f"int32 accumulator can overflow in output channel {n}: bound {int(bound[n])} > 2^31-1 "
                          f"(K={site.wq.shape[0]})", node=site.matmul,
                          hint="split the reduction (K) into chunks or lower the activation bits")
            worst_bound = max(worst_bound, int(bound.max()))
            if site.out in graph.outputs:  # a graph output stays int32 up to its float boundary
                self._rewrite(graph, site, k.astype(np.int32), real, None, None, None)
                self.stats["int32_outputs"] += 1
                continue
            st = stats[site.out]
            so, zo = self._out_qparams(float(st.cmin.min()), float(st.cmax.max()))
            b, c, err = dyadic(real / so, self.options.mult_bits, self.options.shared_shift)
            worst_err = max(worst_err, err)
            shifts += [int(c.min()), int(c.max())]
            self._rewrite(graph, site, k.astype(np.int32), b, c, so, zo)
            self.stats["linears"] += 1
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        self.ctx.report["dyadic"] = {
            "linears": self.stats["linears"], "out_bits": self.options.out_bits,
            "mult_bits": self.options.mult_bits, "worst_relative_scale_error": worst_err,
            "shift_range": [min(shifts), max(shifts)] if shifts else None, "worst_accumulator_bound": worst_bound,
            "accumulator_headroom_bits": float(np.log2(INT32_MAX / max(worst_bound, 1)))}
        return PassResult(model, modified=True)

    def _rewrite(self, graph, site: _Site, k, b, c, so, zo) -> None:
        o, at, name = self.name, site.matmul, site.name

        def node(op, inputs, suffix, domain="", **attrs):
            return make_node(graph, op, inputs, origin=o, name=f"{name}.{suffix}", attributes=attrs, domain=domain,
                             before=at).outputs[0]

        def const(suffix, arr):
            return add_initializer(graph, f"{name}.{suffix}", np.asarray(arr))

        acc = node("MatMulInteger", [site.xq, const("weight_q", site.wq)], "matmul_int")
        acc.dtype = ir.DataType.INT32
        acc2 = node("Add", [acc, const("acc_offset", k)], "acc_offset")
        acc2.dtype = ir.DataType.INT32
        acc2.producer().metadata_props["lowbit.no_overflow"] = "int32"  # proven in call(): lowerings may fold it
        if c is None:  # b holds the real per-channel scale: DequantizeLinear(int32) is the boundary
            y = node("DequantizeLinear", [acc2, const("out_scale", b.astype(np.float32))], "out_dq", axis=-1)
        else:
            y = self._requantize(node, const, acc2, b, c, so, zo)
        y.dtype = ir.DataType.FLOAT
        replace_value(graph, site.out, y)

    @staticmethod
    def _requantize(node, const, acc2, b, c, so, zo) -> ir.Value:
        yq = node("Requantize", [acc2, const("mult", b.astype(np.int64)), const("shift", c.astype(np.int64)),
                                 const("out_zero_point", zo)], "requantize", domain=DOMAIN)
        yq.dtype = ir.DataType.from_numpy(zo.dtype)
        return node("DequantizeLinear", [yq, const("out_step", np.float32(so)), const("out_zp", zo)], "out_dq")
