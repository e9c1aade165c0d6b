"""lowbit ops of integer regions, run in plain ONNX through in-graph lowerings (domain ``lowbit``, version 1).

Both register with :func:`lowbit.ops.registry.lowbit_op`; their lowerings (``emit_requantize``,
``emit_lookup``) are what the ``lower-lowbit`` pass emits for ORT, proven bit-exact against the
references in tests.  Neither has a function body: the lowerings fold constant operands.

``lowbit.Requantize`` — the dyadic requantizer of HAWQ-V3::

    y = saturate_T( floor((acc · b + 2^(c−1)) / 2^c) + zero_point )

``acc`` int32, ``b`` int64 multiplier in [1, 2^30), ``c`` int64 shift in [1, 62] (``b`` and ``c``
scalars or per last-axis channel), ``zero_point`` of the output type T ∈ {int8, uint8, int16}.
The shift rounds half up (towards +∞).  Because |acc| < 2^31 and b < 2^30, |acc·b| < 2^61.

ORT body.  ORT's BitShift exists only for unsigned types and Cast int64→int8 wraps, so::

    t = Cast<int64>(acc) · b + (2^62 + 2^(c−1))          # > 0, since |acc·b| < 2^61
    r = Cast<int64>(BitShift_right(Cast<uint64>(t), c))   # = floor((acc·b + 2^(c−1)) / 2^c) + 2^(62−c)
    y = Cast<T>(Clip(r + (zero_point − 2^(62−c)), qmin, qmax))

The identity used: 2^62 is a multiple of 2^c, so floor((p + 2^62) / 2^c) = floor(p / 2^c) + 2^(62−c).

``lowbit.Lookup`` — an elementwise function of an 8-bit code, one table per channel::

    y[..., j] = table[j, x[..., j] − qmin(x)]    (table [C, 256] or [256]; x int8/uint8; y of table's type)

ORT body: Gather(flat table, Cast<int32>(x) + (256·j − qmin)).  Exact by construction: a non-linearity
between 8-bit tensors (DQ → f → Q) has only 256 inputs per channel, so the table *is* its integer form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.ops.registry import lowbit_op
from lowbit.ir.rewrite import add_initializer, make_node

__all__ = ["QRANGE", "dyadic", "emit_requantize", "requantize_reference", "emit_lookup", "lookup_reference",
           "widened_requantize"]

_OFFSET_BITS = 62
QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int16): (-32768, 32767)}


def dyadic(m: np.ndarray, bits: int = 30, shared_shift: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """b, c with b / 2^c ≈ m (m > 0): b < 2^bits; returns the worst relative error.

    Per channel, b has ``bits`` significant bits.  With ``shared_shift`` one c serves all channels
    (the largest m gets ``bits`` significant bits, smaller ones fewer), which lets the ORT body
    clip with scalar bounds.
    """
    m = np.asarray(m, np.float64)
    if np.any(~np.isfinite(m)) or np.any(m <= 0):
        raise ValueError("dyadic scales must be finite and positive")
    e = np.floor(np.log2(m)).astype(np.int64)  # 2^e <= m < 2^(e+1)
    if shared_shift:
        e = np.full_like(e, e.max())
    c = (bits - 1) - e
    b = np.round(m * np.exp2(c.astype(np.float64))).astype(np.int64)
    carry = b >= (1 << bits)  # rounding reached 2^bits: renormalise
    if shared_shift and np.any(carry):
        c = c - 1
        b = np.round(m * np.exp2(c.astype(np.float64))).astype(np.int64)
    else:
        b = np.where(carry, b >> 1, b)
        c = np.where(carry, c - 1, c)
    if np.any(b < 1):
        raise ValueError("a scale is too small next to the largest one for a shared shift")
    if np.any(c < 1) or np.any(c > _OFFSET_BITS):
        raise ValueError(f"scale out of the dyadic range (shift {int(c.min())}..{int(c.max())}, needs 1..62)")
    err = float(np.max(np.abs(b / np.exp2(c.astype(np.float64)) - m) / m))
    return b, c, err


def widened_requantize(b: np.ndarray, c: np.ndarray, zp: np.ndarray, step: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The int16 form of an 8-bit Requantize read through ``DQ(·; step, zp)``: same range, 257× finer.

    The 8-bit codes q ∈ [lo, lo + 255] stand for ``(q − zp)·step``.  Codes q' = (q − lo)·257 − 32768 span
    int16 exactly (255·257 = 65535), so ``step' = step/257``, ``zp' = (zp − lo)·257 − 32768`` and the
    multiplier b/2^c becomes 257·b/2^c, renormalised to 30 significant bits (one shift, as ``dyadic``).
    Returns (b', c', zp' int16, step').
    """
    zp = np.asarray(zp)
    lo = QRANGE[zp.dtype][0]
    m = np.asarray(b, np.float64) * 257.0 / np.exp2(np.asarray(c, np.float64))
    b2, c2, _ = dyadic(m, 30, shared_shift=np.asarray(c).size == 1 or np.ptp(c) == 0)
    if np.asarray(c).size == 1:
        c2 = c2.reshape(-1)[:1].reshape(np.shape(c))
    z2 = ((zp.astype(np.int64) - lo) * 257 - 32768).astype(np.int16)
    return b2.astype(np.int64), c2.astype(np.int64), z2, (np.asarray(step, np.float64) / 257.0).astype(np.float32)


def _check_requantize(acc, b, c, zp):
    if acc.dtype != np.int32:
        raise TypeError(f"lowbit.Requantize: acc must be int32, got {acc.dtype}")
    if zp.dtype not in QRANGE:
        raise TypeError(f"lowbit.Requantize: zero_point must be int8/uint8/int16, got {zp.dtype}")
    if np.any(b < 1) or np.any(b >= (1 << 30)) or np.any(c < 1) or np.any(c > _OFFSET_BITS):
        raise ValueError("lowbit.Requantize: needs 1 <= b < 2^30 and 1 <= c <= 62")


@dataclass(frozen=True)
class _Consts:
    k1: np.ndarray
    c: np.ndarray
    k2: np.ndarray


def _requantize_consts(b, c, zp) -> _Consts:
    c = np.asarray(c, np.int64)
    k1 = (np.int64(1) << np.int64(_OFFSET_BITS)) + (np.int64(1) << (c - 1))
    k2 = zp.astype(np.int64) - (np.int64(1) << (np.int64(_OFFSET_BITS) - c))
    return _Consts(k1.astype(np.int64), c.astype(np.uint64), k2.astype(np.int64))


def emit_requantize(graph: ir.Graph, acc: ir.Value, b: np.ndarray, c: np.ndarray, zp: np.ndarray, *, origin: str,
                    name: str, before: ir.Node | None = None, offset: np.ndarray | None = None) -> ir.Value:
    """Standard-ONNX body of Requantize(acc + offset, b, c, zp) with constant b, c, zero point (the ORT lowering).

    With one shift c for all channels and c + bits(T) ≤ 60 (so 2^(62−c) ≡ 0 modulo 2^bits(T) and the
    folded constant keeps t inside int64), a shorter body is used::

        u = BitShift(Cast<uint64>(acc·b + (offset·b + 2^62 + 2^(c−1) + zp·2^c)), c)   # = y + 2^(62−c)
        y = Cast<T>(Clip(u, qmin + 2^(62−c), qmax + 2^(62−c)))                       # low bits: wrap = y

    (the folded offset and zero point are exact: offset·b is what (acc + offset)·b adds, and zp·2^c
    is a multiple of 2^c).  ``offset`` (int32 per channel) is only valid when acc + offset cannot
    overflow int32, which ``dyadic`` proves before emitting it.
    """
    zp = np.asarray(zp)
    b = np.asarray(b, np.int64)
    cs = np.unique(np.asarray(c, np.int64))
    lo, hi = QRANGE[zp.dtype]
    to = ir.DataType.from_numpy(zp.dtype)
    bits = zp.dtype.itemsize * 8

    def node(op, inputs, suffix, **attrs):
        return make_node(graph, op, inputs, origin=origin, name=f"{name}.{suffix}", attributes=attrs,
                         before=before).outputs[0]

    def const(suffix, arr):
        return add_initializer(graph, f"{name}.{suffix}", np.asarray(arr))

    a64 = node("Cast", [acc], "acc_i64", to=ir.DataType.INT64)
    off = np.int64(0) if offset is None else np.asarray(offset, np.int64) * b
    if cs.size == 1 and int(cs[0]) + bits <= 60:  # then 0 < t < 2^63: 2^61 + 2^62 + |zp|·2^c + 2^(c-1) fits
        c0 = np.int64(cs[0])
        base = np.int64(1) << np.int64(_OFFSET_BITS - c0)
        k = off + (np.int64(1) << np.int64(_OFFSET_BITS)) + (np.int64(1) << (c0 - 1)) + zp.astype(np.int64) * (
            np.int64(1) << c0)
        t = node("Add", [node("Mul", [a64, const("b", b)], "mul_b"), const("k", np.asarray(k, np.int64))], "offset")
        u = node("BitShift", [node("Cast", [t], "as_u64", to=ir.DataType.UINT64), const("c", np.uint64(c0))], "shift",
                 direction=ir.AttrString("direction", "RIGHT"))
        clipped = node("Clip", [u, const("qmin", np.uint64(base + lo)), const("qmax", np.uint64(base + hi))],
                       "saturate")
    else:
        k = _requantize_consts(b, c, zp)
        t = node("Add", [node("Mul", [a64, const("b", b)], "mul_b"), const("k1", k.k1 + off)], "offset")
        u = node("Cast", [t], "as_u64", to=ir.DataType.UINT64)
        s = node("BitShift", [u, const("c", k.c)], "shift", direction=ir.AttrString("direction", "RIGHT"))
        r = node("Add", [node("Cast", [s], "as_i64", to=ir.DataType.INT64), const("k2", k.k2)], "zero_point")
        clipped = node("Clip", [r, const("qmin", np.int64(lo)), const("qmax", np.int64(hi))], "saturate")
    out = node("Cast", [clipped], "narrow", to=to)
    out.dtype = to
    return out


def _lower_requantize(graph: ir.Graph, node: ir.Node, origin: str) -> ir.Value:
    consts = [v.const_value for v in node.inputs[1:4]]
    if any(t is None for t in consts):
        raise ValueError(f"lowbit.Requantize '{node.name}': b, c and zero_point must be constants to lower to ORT")
    b, c, zp = (t.numpy() for t in consts)
    acc, offset = node.inputs[0], None
    add = acc.producer()
    if (add is not None and add.op_type == "Add" and len(list(acc.uses())) == 1 and add.inputs[1].const_value is not None
            and add.inputs[1].const_value.dtype == ir.DataType.INT32 and add.metadata_props.get("lowbit.no_overflow")):
        acc, offset = add.inputs[0], add.inputs[1].const_value.numpy()  # fold the proven int32 offset into int64
    return emit_requantize(graph, acc, b, c, zp, origin=origin, name=node.name or "requantize", before=node,
                           offset=offset)


@lowbit_op("Requantize", doc="y = sat_T(floor((acc·b + 2^(c−1)) / 2^c) + zero_point); b in [1, 2^30), c in [1, 62], "
           "scalars or per last-axis channel.",
           inputs=[("acc", "tensor(int32)"), ("b", "tensor(int64)"), ("c", "tensor(int64)"), ("zero_point", "T")],
           outputs=[("y", "T")], types={"T": ["tensor(int8)", "tensor(uint8)", "tensor(int16)"]},
           lower=_lower_requantize)
def requantize_reference(acc: np.ndarray, b: np.ndarray, c: np.ndarray, zp: np.ndarray) -> np.ndarray:
    b, c = np.asarray(b, np.int64), np.asarray(c, np.int64)
    zp = np.asarray(zp)
    _check_requantize(acc, b, c, zp)
    p = acc.astype(np.int64) * b + (np.int64(1) << (c - 1))
    r = np.right_shift(p, c) + zp.astype(np.int64)  # arithmetic shift = floor division by 2^c
    lo, hi = QRANGE[zp.dtype]
    return np.clip(r, lo, hi).astype(zp.dtype)


def _table_base(x_dtype: np.dtype, n_tables: int) -> np.ndarray:
    """Flat-table offset of code qmin(x) per channel: 256·j − qmin (one table: −qmin)."""
    lo = QRANGE[np.dtype(x_dtype)][0]
    return (np.arange(n_tables, dtype=np.int32) * 256 - lo) if n_tables > 1 else np.asarray(-lo, np.int32)


def emit_lookup(graph: ir.Graph, x: ir.Value, x_dtype: np.dtype, table: np.ndarray, *, origin: str, name: str,
                before: ir.Node | None = None) -> ir.Value:
    base = _table_base(x_dtype, table.shape[0] if table.ndim == 2 else 1)
    idx32 = make_node(graph, "Cast", [x], origin=origin, name=f"{name}.index", before=before,
                      attributes={"to": ir.DataType.INT32}).outputs[0]
    idx = make_node(graph, "Add", [idx32, add_initializer(graph, f"{name}.table_base", base)], origin=origin,
                    name=f"{name}.offset", before=before).outputs[0]
    flat = add_initializer(graph, f"{name}.table_flat", table.reshape(-1))
    out = make_node(graph, "Gather", [flat, idx], origin=origin, name=f"{name}.gather", before=before,
                    attributes={"axis": 0}).outputs[0]
    out.dtype = ir.DataType.from_numpy(table.dtype)
    return out


def _lower_lookup(graph: ir.Graph, node: ir.Node, origin: str) -> ir.Value:
    table = node.inputs[1].const_value
    if table is None:
        raise ValueError(f"lowbit.Lookup '{node.name}': the table must be a constant to lower to ORT")
    if node.inputs[0].dtype is None:
        raise ValueError(f"lowbit.Lookup '{node.name}': the input's element type is unknown")
    x_dtype = node.inputs[0].dtype.numpy()
    return emit_lookup(graph, node.inputs[0], x_dtype, table.numpy(), origin=origin, name=node.name or "lookup",
                       before=node)


@lowbit_op("Lookup", doc="y[..., j] = table[j, x[..., j] − qmin(x)]; table [C, 256] (one per last-axis channel) "
           "or [256].", inputs=[("x", "X"), ("table", "T")], outputs=[("y", "T")],
           types={"X": ["tensor(int8)", "tensor(uint8)"],
                  "T": ["tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(int32)", "tensor(float)"]},
           lower=_lower_lookup)
def lookup_reference(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    if x.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or table.shape[-1] != 256:
        raise TypeError(f"lowbit.Lookup: x must be int8/uint8 and tables 256 wide (got {x.dtype}, {table.shape})")
    n = table.shape[0] if table.ndim == 2 else 1
    if n > 1 and x.shape[-1] != n:
        raise ValueError(f"lowbit.Lookup: {n} tables for {x.shape[-1]} channels")
    return table.reshape(-1)[x.astype(np.int32) + _table_base(x.dtype, n)]
