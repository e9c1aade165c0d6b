"""Integer-only normalisation and softmax (I-BERT / I-ViT style), domain ``lowbit`` version 1.

``lowbit.IntNorm`` — LayerNorm (``rms=0``) or RMSNorm (``rms=1``) of integer codes, with an
integer square root, into integer codes.  With C the last axis, ``xi = int64(x) − x_zero_point``::

    d   = C·xi − Σ_C xi            (LayerNorm: C·(x − μ), exact, no division)
        = xi                       (RMSNorm)
    n   = max(floor(Σ_C d² / C), n_min)          (LayerNorm: C²·var; RMSNorm: mean(x²))
    L   = bit length of n;  e = ⌊(60 − L)/2⌋      (n·4^e has 59 or 60 bits: r keeps 29+ bits)
    r   = isqrt(n·4^e) = ⌊2^e·√n⌋
    f   = ⌊2^60 / r⌋                              (one division per row, 30–31 bits)
    z_j = trunc(d_j·f / 2^(60−e−F))              (d/√n with F = ``frac_bits`` fractional bits)
    y_j = sat_T( floor((z_j·g_j + bias_j + 2^(c−1)) / 2^c) + zero_point )

``g`` (int64, per channel) carries γ_j / s_out·2^(c−F), ``bias`` carries β_j / s_out·2^c, so per-channel
output steps (migrated steps of the linears that read the norm) cost nothing.  ``n_min`` plays ε's
role.  Contract (checked by the reference): |d| < 2^31, Σd² < 2^62 and |z·g| + |bias| < 2^61;
then d·f < 2^31·2^31 (r ≥ 2^29).

ORT body.  isqrt of n' = n·4^e ∈ [2^58, 2^62) by Newton's method from above: x₀ from a 1024-entry
table indexed by n' >> 52 (x₀ ≥ √n', relative excess δ < 1/128), then three steps of
x ← min(x, ⌊(x + ⌊n'/x⌋)/2⌋).  The relative excess after a step is below δ²/2 (δ: 2^-7 → 2^-15
→ 2^-31 → 2^-63), and √n' < 2^31, so three steps reach ⌊√n'⌋; ⌊(x + ⌊n'/x⌋)/2⌋ ≥ ⌊√n'⌋ (AM–GM),
and the min keeps the sequence non-increasing, so it stays there.  L is Σ_k [n ≥ 2^k] (one
comparison against 63 constants); 4^e and 2^(60−e−F) are gathered from 64-entry tables indexed by L.
The tail is Requantize's offset-into-uint64 + BitShift form (see :mod:`lowbit.ops.integer_ops`).

``lowbit.IntSoftmax`` — softmax of 8-bit codes by an exact exp table (I-ViT's lookup form)::

    m = max_{keep} x;  e_i = keep_i ? table[m − x_i] : 0;  S = Σ e
    y_i = floor((510·e_i + S) / (2·S))            (= round_half_up(255·e_i / S), uint8, step 1/255)

``table[k] = round(2^15·exp(−k·s_x))`` for the logits' step s_x: with 8-bit inputs every difference
m − x is one of 256 codes, so the table is exp's integer form.  ``keep`` (bool, broadcast against
x) is the attention mask.  int32 throughout: 510·2^15 < 2^24 and 2·S ≤ 2·L·2^15 < 2^31 for L < 2^15.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node
from lowbit.ops.integer_ops import QRANGE
from lowbit.ops.registry import lowbit_op

__all__ = ["NEWTON_STEPS", "exp_table", "int_norm_reference", "int_softmax_reference", "isqrt_newton",
           "isqrt_start"]

NEWTON_STEPS = 3
EXP_BITS = 15
_OFF = 62


def isqrt_start() -> np.ndarray:
    """x₀ for n' in [2^58, 2^62), indexed by n' >> 52: ⌊√((i+1)·2^52 − 1)⌋ + 1 ≥ √n' (relative excess < 1/128)."""
    return np.array([math.isqrt(((i + 1) << 52) - 1) + 1 for i in range(1024)], np.int64)


def isqrt_newton(n: np.ndarray, steps: int = NEWTON_STEPS) -> np.ndarray:
    """The ORT body's isqrt of n' in [2^58, 2^62), in numpy (for tests): table start, ``steps`` Newton steps."""
    n = np.asarray(n, np.int64)
    x = isqrt_start()[n >> 52]
    for _ in range(steps):
        x = np.minimum(x, (x + n // x) // 2)
    return x


def exp_table(step: float) -> np.ndarray:
    """round(2^15·exp(−k·step)) for k = 0..255 (int32): the IntSoftmax table for logits of step ``step``."""
    k = np.arange(256, dtype=np.float64)
    return np.round(np.exp2(EXP_BITS) * np.exp(-k * float(step))).astype(np.int32)


def _norm_d(x: np.ndarray, zx: np.ndarray, rms: int) -> np.ndarray:
    xi = x.astype(np.int64) - np.asarray(zx).astype(np.int64)
    if rms:
        return xi
    return x.shape[-1] * xi - xi.sum(-1, keepdims=True)


def _int_attrs(node: ir.Node) -> dict:
    return {k: int(a.value) for k, a in node.attributes.items()}


def _norm_check(d, f, g, bias):
    c = d.shape[-1]
    big = float(np.abs(d).max(initial=0))
    if c * big * big >= 2.0 ** 62:
        raise ValueError("lowbit.IntNorm: Σd² can reach 2^62 (input range too wide for C)")
    if big * float(f.max(initial=0)) * float(np.abs(g).max(initial=0)) + float(np.abs(bias).max(initial=0)) >= 2.0 ** 61:
        raise ValueError("lowbit.IntNorm: d·f·g + bias can reach 2^61 (frac_bits or g too large)")


def _row_tables(frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Indexed by bit length L = 0..63: 4^e and 2^(60−e−F)."""
    ln = np.arange(64, dtype=np.int64)
    e = np.maximum((60 - ln) // 2, 0)
    one = np.int64(1)
    return one << (2 * e), one << (60 - e - frac_bits)


@lowbit_op("IntNorm", doc="Integer LayerNorm (rms=0) / RMSNorm (rms=1): d = C·(x−zx) − Σ(x−zx) (or x−zx), "
           "n = max(⌊Σd²/C⌋, n_min), e = ⌊(60 − bitlen n)/2⌋, f = ⌊2^60 / isqrt(n·4^e)⌋, "
           "z = trunc(d·f / 2^(60−e−frac_bits)), y = sat_T(⌊(z·g + bias + 2^(shift−1)) / 2^shift⌋ + zero_point).",
           inputs=[("x", "X"), ("x_zero_point", "X"), ("g", "tensor(int64)"), ("bias", "tensor(int64)"),
                   ("zero_point", "T")], outputs=[("y", "T")],
           types={"X": ["tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(int32)"],
                  "T": ["tensor(int8)", "tensor(uint8)", "tensor(int16)"]},
           attributes=("rms", "frac_bits", "shift", "n_min"), lower=lambda g, n, o: _lower_norm(g, n, o))
def int_norm_reference(x, x_zero_point, g, bias, zero_point, *, rms=0, frac_bits=20, shift=36, n_min=1):
    if not 1 <= shift <= 44 or not 0 <= frac_bits <= 30 or n_min < 1:
        raise ValueError("lowbit.IntNorm: needs 1 <= shift <= 44, 0 <= frac_bits <= 30, n_min >= 1")
    zero_point = np.asarray(zero_point)
    d = _norm_d(x, x_zero_point, rms)
    big = float(np.abs(d).max(initial=0))
    if big >= 2.0 ** 31 or x.shape[-1] * big * big >= 2.0 ** 62:
        raise ValueError("lowbit.IntNorm: |d| or Σd² can reach 2^31 / 2^62 (input range too wide for C)")
    n = np.maximum((d * d).sum(-1, keepdims=True) // x.shape[-1], np.int64(n_min))
    e = np.maximum((60 - np.vectorize(int.bit_length, otypes=[np.int64])(n.astype(object))) // 2, 0)
    r = np.vectorize(math.isqrt, otypes=[np.int64])(n << (2 * e))  # the truth: exact integer square root
    f = (np.int64(1) << np.int64(60)) // r
    p = d * f
    z = np.sign(p) * (np.abs(p) >> (60 - e - frac_bits))  # truncation towards zero
    g, bias = np.asarray(g, np.int64), np.asarray(bias, np.int64)
    if float(np.abs(z).max(initial=0)) * float(np.abs(g).max(initial=0)) + float(np.abs(bias).max(initial=0)) >= 2.0 ** 61:
        raise ValueError("lowbit.IntNorm: z·g + bias can reach 2^61 (g or bias too large)")
    t = z * g + bias + (np.int64(1) << np.int64(shift - 1))
    lo, hi = QRANGE[zero_point.dtype]
    return np.clip(np.right_shift(t, np.int64(shift)) + zero_point.astype(np.int64), lo, hi).astype(zero_point.dtype)


def _node(graph, before, origin, name):
    def node(op, inputs, suffix, **attrs):
        return make_node(graph, op, inputs, origin=origin, name=f"{name}.{suffix}", attributes=attrs,
                         before=before).outputs[0]

    def const(suffix, arr):
        return add_initializer(graph, f"{name}.{suffix}", np.asarray(arr))

    return node, const


def _lower_norm(graph: ir.Graph, node: ir.Node, origin: str) -> ir.Value:
    consts = [v.const_value for v in node.inputs[1:5]]
    if any(t is None for t in consts):
        raise ValueError(f"lowbit.IntNorm '{node.name}': zero points, g and bias must be constants to lower to ORT")
    zx, g, bias, zp = (np.asarray(t.numpy()) for t in consts)
    a = {"rms": 0, "frac_bits": 20, "shift": 36, "n_min": 1, **_int_attrs(node)}
    c_len = g.shape[-1]
    n_, k_ = _node(graph, node, origin, node.name or "int_norm")
    axes = k_("axes", np.array([-1], np.int64))
    x = n_("Cast", [node.inputs[0]], "x_i64", to=ir.DataType.INT64)
    if a["rms"]:
        d = n_("Sub", [x, k_("x_zp", zx.astype(np.int64))], "d") if np.any(zx) else x
    else:
        d = n_("Sub", [n_("Mul", [x, k_("c", np.int64(c_len))], "cx"), n_("ReduceSum", [x, axes], "sum", keepdims=1)],
               "d")
    sq = n_("ReduceSum", [n_("Mul", [d, d], "d2"), axes], "sum_d2", keepdims=1)
    n = n_("Max", [n_("Div", [sq, k_("c_div", np.int64(c_len))], "mean_d2"), k_("n_min", np.int64(a["n_min"]))], "n")
    pow2 = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))
    bitlen = n_("ReduceSum", [n_("Cast", [n_("GreaterOrEqual", [n, k_("pow2", pow2)], "ge_pow2")], "ge_i64",
                                  to=ir.DataType.INT64), axes], "bitlen", keepdims=1)
    mul4, div = _row_tables(a["frac_bits"])
    n = n_("Mul", [n, n_("Gather", [k_("scale_4e", mul4), bitlen], "scale", axis=0)], "n_scaled")
    r = n_("Gather", [k_("isqrt_start", isqrt_start()), n_("Div", [n, k_("two_52", np.int64(1) << 52)], "top_bits")],
           "isqrt_x0", axis=0)
    two = k_("two", np.int64(2))
    for i in range(NEWTON_STEPS):
        step = n_("Div", [n_("Add", [r, n_("Div", [n, r], f"newton{i}.q")], f"newton{i}.s"), two], f"newton{i}.h")
        r = n_("Min", [r, step], f"newton{i}")
    f = n_("Div", [k_("two_60", np.int64(1) << np.int64(60)), r], "factor")
    z = n_("Div", [n_("Mul", [d, f], "df"), n_("Gather", [k_("row_div", div), bitlen], "row_div", axis=0)], "z")
    t = n_("Mul", [z, k_("g", g.astype(np.int64))], "zg")
    return _shift_saturate(n_, k_, t, bias.astype(np.int64), a["shift"], zp)


def _shift_saturate(n_, k_, t, add: np.ndarray, c: int, zp: np.ndarray) -> ir.Value:
    """sat_T(⌊(t + add + 2^(c−1)) / 2^c⌋ + zp) for |t + add| < 2^61, c + bits(T) ≤ 60 (uint64 shift form)."""
    lo, hi = QRANGE[zp.dtype]
    base = np.int64(1) << np.int64(_OFF - c)
    k = add + (np.int64(1) << np.int64(_OFF)) + (np.int64(1) << np.int64(c - 1)) + zp.astype(np.int64) * (
        np.int64(1) << np.int64(c))
    u = n_("BitShift", [n_("Cast", [n_("Add", [t, k_("k", k)], "offset")], "as_u64", to=ir.DataType.UINT64),
                        k_("c", np.uint64(c))], "shift", direction=ir.AttrString("direction", "RIGHT"))
    clipped = n_("Clip", [u, k_("qmin", np.uint64(base + lo)), k_("qmax", np.uint64(base + hi))], "saturate")
    out = n_("Cast", [clipped], "narrow", to=ir.DataType.from_numpy(zp.dtype))
    out.dtype = ir.DataType.from_numpy(zp.dtype)
    return out


@lowbit_op("IntSoftmax", doc="Softmax of 8-bit codes over the last axis by an exp table: m = max over keep, "
           "e = keep ? table[m − x] : 0, y = ⌊(510·e + Σe) / (2·Σe)⌋ (uint8, step 1/255).",
           inputs=[("x", "X"), ("table", "tensor(int32)"), ("keep", "tensor(bool)", "optional")],
           outputs=[("y", "tensor(uint8)")], types={"X": ["tensor(int8)", "tensor(uint8)"]},
           lower=lambda g, n, o: _lower_softmax(g, n, o))
def int_softmax_reference(x, table, keep=None):
    if x.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or table.shape != (256,) or table.dtype != np.int32:
        raise TypeError("lowbit.IntSoftmax: x int8/uint8 and an int32 table of 256 entries")
    if np.any(table < 0) or np.any(table >= 2 ** EXP_BITS + 1) or x.shape[-1] * 2.0 * float(table.max()) >= 2.0 ** 31:
        raise ValueError("lowbit.IntSoftmax: table entries in [0, 2^15] and 2·L·table[0] < 2^31")
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(keep, x.shape)
    xi = x.astype(np.int32)
    m = np.where(keep, xi, np.int32(-256)).max(-1, keepdims=True)
    e = np.where(keep, table[np.clip(m - xi, 0, 255)], 0).astype(np.int32)
    s = np.maximum(e.sum(-1, keepdims=True, dtype=np.int32), 1)
    return ((510 * e + s) // (2 * s)).astype(np.uint8)


def _lower_softmax(graph: ir.Graph, node: ir.Node, origin: str) -> ir.Value:
    table = node.inputs[1].const_value
    if table is None:
        raise ValueError(f"lowbit.IntSoftmax '{node.name}': the table must be a constant to lower to ORT")
    n_, k_ = _node(graph, node, origin, node.name or "int_softmax")
    axes = k_("axes", np.array([-1], np.int64))
    x = n_("Cast", [node.inputs[0]], "x_i32", to=ir.DataType.INT32)
    keep = node.inputs[2] if len(node.inputs) > 2 else None
    masked = n_("Where", [keep, x, k_("neg", np.int32(-256))], "masked") if keep is not None else x
    m = n_("ReduceMax", [masked, axes], "max", keepdims=1)
    idx = n_("Clip", [n_("Sub", [m, x], "diff"), k_("lo", np.int32(0)), k_("hi", np.int32(255))], "diff_clip")
    e = n_("Gather", [k_("table", table.numpy()), idx], "exp", axis=0)
    if keep is not None:
        e = n_("Where", [keep, e, k_("zero", np.int32(0))], "exp_kept")
    s = n_("Max", [n_("ReduceSum", [e, axes], "sum", keepdims=1), k_("one", np.int32(1))], "sum_pos")
    num = n_("Add", [n_("Mul", [e, k_("k510", np.int32(510))], "e510"), s], "num")
    y = n_("Cast", [n_("Div", [num, n_("Add", [s, s], "two_s")], "div")], "narrow", to=ir.DataType.UINT8)
    y.dtype = ir.DataType.UINT8
    return y
