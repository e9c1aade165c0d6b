"""The int32 accumulator bound of every integer GEMM a backend will run.

An integer GEMM accumulates ``acc_n = Σ_k (a_k − z_a)(w_kn − z_w)`` in int32.  With
``|a_k − z_a| ≤ A`` (from the activation's integer type and zero point) the accumulator is bounded by
``A · max_n Σ_k |w_kn − z_w|`` ≤ ``K · A · max|w − z_w|``.  lowbit refuses a layer whose
``K · A · max|w|`` exceeds 2^31 − 1 (for int8 weights and uint8 activations: K > 66 000): past it the
result can wrap — and ORT gives garbage with no error — for weights of that range, and a layer that
only stays inside by luck of its column sums is one outlier away from wrapping.  Sites are the explicit integer ops
(``MatMulInteger``, ``MatMulIntegerToFloat``, ``QLinearMatMul``) and the QDQ form that ONNX Runtime
fuses into them (``MatMul`` of two 8-bit ``DequantizeLinear`` outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.errors import NumericalError

__all__ = ["AccumulatorSite", "accumulator_sites", "check_accumulators", "INT32_MAX"]

INT32_MAX = 2 ** 31 - 1
_RANGE = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535),
          ir.DataType.INT16: (-32768, 32767)}


@dataclass
class AccumulatorSite:
    node: str
    op: str
    k: int
    a_bound: int
    w_bound: int  # max |w - z_w|
    bound: int  # K · A · max|w − z_w|: the worst case of any weights of this range
    column_bound: int | None = None  # A · max_n Σ_k |w_kn − z_w|: the worst case of these weights

    @property
    def overflows(self) -> bool:
        return self.bound > INT32_MAX


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
        return prod.attributes["value"].value.numpy()
    return None


def _int_dtype(a: ir.Value, zp: ir.Value | None):
    """The integer type of ``a`` (shape inference may not have run: fall back on its zero point / producer)."""
    if a.dtype is not None:
        return a.dtype
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    prod = a.producer()
    if prod is not None and prod.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
        zps = list(prod.inputs)[2:3]
        if zps and zps[0] is not None and zps[0].dtype is not None:
            return zps[0].dtype
        return ir.DataType.UINT8
    return None


def _a_bound(a: ir.Value, zp: ir.Value | None) -> int | None:
    dtype = _int_dtype(a, zp)
    lo_hi = _RANGE.get(dtype) if dtype is not None else None
    if lo_hi is None:
        return None
    lo, hi = lo_hi
    z = _const(zp)
    if z is None:
        return hi - lo if zp is not None else max(abs(lo), abs(hi))  # a dynamic zero point: anywhere in range
    z = np.asarray(z, np.int64)
    return int(max(np.max(np.abs(hi - z)), np.max(np.abs(z - lo))))


def _site(node: ir.Node, a: ir.Value, a_zp, w: ir.Value, w_zp) -> AccumulatorSite | None:
    a_bound = _a_bound(a, a_zp)
    if a_bound is None:
        return None
    wq = _const(w)
    if wq is not None and wq.ndim >= 2:
        wz = _const(w_zp)
        wz = np.zeros((), np.int64) if wz is None else np.asarray(wz, np.int64)
        if wz.ndim == 1 and wz.size == wq.shape[-1]:
            wz = wz.reshape(1, -1)
        d = np.abs(wq.astype(np.int64) - wz)
        k = int(wq.shape[-2])
        w_bound = int(d.max(initial=0))
        return AccumulatorSite(node.name or node.op_type, node.op_type, k, a_bound, w_bound, k * a_bound * w_bound,
                               int(a_bound * int(d.sum(axis=-2).max(initial=0))))
    shape = w.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[-2], int):
        return None
    lo_hi = _RANGE.get(w.dtype) if w.dtype is not None else None
    if lo_hi is None:
        return None
    wb = max(abs(lo_hi[0]), abs(lo_hi[1]))
    k = int(shape[-2])
    return AccumulatorSite(node.name or node.op_type, node.op_type, k, a_bound, wb, k * a_bound * wb, None)


def accumulator_sites(model: ir.Model) -> list[AccumulatorSite]:
    sites = []
    for node in model.graph:
        ins = list(node.inputs) + [None] * 8
        site = None
        if node.op_type == "MatMulInteger" and ins[0] is not None and ins[1] is not None:
            site = _site(node, ins[0], ins[2], ins[1], ins[3])
        elif node.op_type == "MatMulIntegerToFloat" and ins[0] is not None and ins[1] is not None:
            site = _site(node, ins[0], ins[4], ins[1], ins[5])
        elif node.op_type == "QLinearMatMul" and ins[0] is not None and ins[3] is not None:
            site = _site(node, ins[0], ins[2], ins[3], ins[5])
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            pa, pw = (v.producer() if v is not None else None for v in ins[:2])
            if (pa is not None and pw is not None and pa.op_type == pw.op_type == "DequantizeLinear"
                    and "block_size" not in pw.attributes):
                pa_in, pw_in = list(pa.inputs) + [None] * 3, list(pw.inputs) + [None] * 3
                if pa_in[0] is not None and pw_in[0] is not None and pw_in[0].dtype in _RANGE:
                    site = _site(node, pa_in[0], pa_in[2], pw_in[0], pw_in[2])
        if site is not None:
            sites.append(site)
    return sites


def check_accumulators(model: ir.Model) -> list[AccumulatorSite]:
    """Refuse (naming the layer) any integer GEMM whose int32 accumulator can wrap; returns the sites."""
    sites = accumulator_sites(model)
    bad = [s for s in sites if s.overflows]
    if bad:
        s = max(bad, key=lambda x: x.bound)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NumericalError(
            f"node '{s.node}' ({s.op}): the int32 accumulator can overflow: K={s.k} × max|a|={s.a_bound} × "
            f"max|w|={s.w_bound} gives a bound of {s.bound:,} > 2^31-1{more}; the output can be garbage",
            hint="keep this layer in float or use fewer activation bits (e.g. a w8a16/w4a16 recipe), "
                 "or split the reduction dimension")
    return sites
