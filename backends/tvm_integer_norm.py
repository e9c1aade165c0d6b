"""The integer norm on TVM, with its neighbours folded in: the residual add before it and the
Requantize of its codes after it.

:func:`fuse_integer_norms` (on the ONNX IR, before TVM's importer) rewrites::

    Add(Cast→int32(a), Cast→int32(b)) → IntNorm → y ─┬─ (other uses of y)
                                                     └─ Cast→int32 → Requantize(rb, rc, rz) → y2
    ≡ lowbit.tvm::IntNormFused(a, b, …) → (y, y2)

exact because a and b are at most 16-bit codes, so their int32 sum never wraps and equals the
int64 sum the kernel forms; the Requantize reads y's codes as the reference does.  Either half is
optional (an IntNorm without the add, or whose codes are not requantized).

:func:`int_norm_cpu` is the reference's formula (``lowbit.ops.integer_nonlinear``) row by row;
the integer square root is the exact digit-by-digit method (32 steps of "subtract the next odd
square"), so no table and no float.  TVM is imported inside the functions only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["fuse_integer_norms", "int_norm_cpu"]

logger = logging.getLogger(__name__)

DOMAIN = "lowbit.tvm"
_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
_NARROW = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16)


def int_norm_cpu(C: int, x_dtype: str, out_dtype: str, *, rms: int, frac_bits: int, shift: int, n_min: int,
                 x2_dtype: str | None = None, rq_dtype: str | None = None):
    """PrimFunc (X[R, C], X2[·, C], zx[1] i64, g[C] i64, bias[C] i64, zp[C] T, rb[C] i64, rc[C] i64,
    rz[C] U) -> (Y[R, C] T, Y2[·, C] U): lowbit.IntNorm of X (+ X2 with ``x2_dtype``), and with
    ``rq_dtype`` = U also Y2 = Requantize(Y; rb, rc, rz).  Unused inputs/outputs are [1, C] and never touched."""
    from tvm.script import tirx as T

    lo, hi = _RANGE[out_dtype]
    lo2, hi2 = _RANGE[rq_dtype or out_dtype]
    two, rq = x2_dtype is not None, rq_dtype is not None
    F = frac_bits
    mult, centre = (1, 0) if rms else (C, 1)  # RMSNorm: d = x − zx; LayerNorm: d = C·(x − zx) − Σ(x − zx)

    def xi(X, X2, ZX, r, j):  # x − zx as int64 (x = X + X2 when the residual add is folded in)
        x = T.Cast("int64", X[r, j]) + T.Cast("int64", X2[r, j]) if two else T.Cast("int64", X[r, j])
        return x - ZX[0]

    @T.prim_func
    def int_norm(x: T.handle, x2: T.handle, zx: T.handle, g: T.handle, bias: T.handle, zp: T.handle, rb: T.handle,
                 rc: T.handle, rz: T.handle, y: T.handle, y2: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        R, R2, R3 = T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x, (R, C), x_dtype)
        X2 = T.match_buffer(x2, (R2, C), x2_dtype or x_dtype)
        ZX = T.match_buffer(zx, (1,), "int64")
        G = T.match_buffer(g, (C,), "int64")
        Bi = T.match_buffer(bias, (C,), "int64")
        Z = T.match_buffer(zp, (C,), out_dtype)
        RB = T.match_buffer(rb, (C,), "int64")
        RC = T.match_buffer(rc, (C,), "int64")
        RZ = T.match_buffer(rz, (C,), rq_dtype or out_dtype)
        Y = T.match_buffer(y, (R, C), out_dtype)
        Y2 = T.match_buffer(y2, (R3, C), rq_dtype or out_dtype)
        d = T.decl_buffer((R * C,), "int64")  # one workspace per call (a per-row one would be allocated R times)
        for r in T.parallel(R):
            s = T.decl_buffer((8,), "int64")  # 0 Σx, 1 Σd², 2 n, 3 bit length, 4 rem, 5 root, 6 f, 7 shift
            s[0] = T.int64(0)
            s[1] = T.int64(0)
            for j in range(C):
                s[0] = s[0] + xi(X, X2, ZX, r, j)
            for j in range(C):
                d[r * C + j] = T.int64(mult) * xi(X, X2, ZX, r, j) - T.int64(centre) * s[0]
                s[1] = s[1] + d[r * C + j] * d[r * C + j]
            s[2] = T.max(T.floordiv(s[1], T.int64(C)), T.int64(n_min))
            s[3] = T.int64(0)
            for k in range(63):
                s[3] = s[3] + T.Cast("int64", s[2] >= T.shift_left(T.int64(1), T.int64(k)))
            s[4] = T.shift_left(s[2], T.int64(2) * T.max(T.floordiv(T.int64(60) - s[3], T.int64(2)), T.int64(0)))
            s[5] = T.int64(0)
            for k in range(32):  # digit by digit: s[5] = ⌊√n'⌋ exactly
                s[6] = T.shift_left(T.int64(1), T.int64(62 - 2 * k))
                if s[4] >= s[5] + s[6]:
                    s[4] = s[4] - (s[5] + s[6])
                    s[5] = T.shift_right(s[5], T.int64(1)) + s[6]
                else:
                    s[5] = T.shift_right(s[5], T.int64(1))
            s[6] = T.floordiv(T.shift_left(T.int64(1), T.int64(60)), s[5])  # f
            s[7] = T.int64(60 - F) - T.max(T.floordiv(T.int64(60) - s[3], T.int64(2)), T.int64(0))  # 60 − e − F
            for j in range(C):
                Y[r, j] = T.Cast(out_dtype, T.max(T.min(T.shift_right(
                    T.if_then_else(d[r * C + j] * s[6] < T.int64(0),
                                   T.int64(0) - T.shift_right(T.int64(0) - d[r * C + j] * s[6], s[7]),
                                   T.shift_right(d[r * C + j] * s[6], s[7])) * G[j] + Bi[j]
                    + T.shift_left(T.int64(1), T.int64(shift - 1)), T.int64(shift))
                    + T.Cast("int64", Z[j]), T.int64(hi)), T.int64(lo)))
            if rq:
                for j in range(C):
                    Y2[r, j] = T.Cast(rq_dtype, T.max(T.min(T.shift_right(
                        T.Cast("int64", Y[r, j]) * RB[j] + T.shift_left(T.int64(1), RC[j] - T.int64(1)), RC[j])
                        + T.Cast("int64", RZ[j]), T.int64(hi2)), T.int64(lo2)))

    return int_norm


def _sole_use(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and value not in graph.outputs else None


def _is(node: ir.Node | None, op: str, domain: tuple[str, ...] = ("", "ai.onnx")) -> bool:
    return node is not None and node.op_type == op and node.domain in domain


def _cast_i32(node: ir.Node | None) -> bool:
    return _is(node, "Cast") and node.attributes["to"].as_int() == ir.DataType.INT32.value


def _residual(norm: ir.Node, graph: ir.Graph) -> list[ir.Node] | None:
    """[Add, Cast, Cast] when the norm reads the int32 sum of two casts of ≤ 16-bit codes, else None."""
    add = norm.inputs[0].producer()
    if not _is(add, "Add") or _sole_use(add.outputs[0], graph) is not norm:
        return None
    casts = [v.producer() for v in add.inputs]
    if not all(_cast_i32(c) and _sole_use(c.outputs[0], graph) is add and c.inputs[0].dtype in _NARROW for c in casts):
        return None
    return [add, *casts]


def _requantize(norm: ir.Node, C: int) -> tuple[ir.Node, ir.Node, list[np.ndarray]] | None:
    """(Cast, Requantize, [b, c, zp] as [C] arrays) of the first requantize of the norm's codes, or None."""
    for use, _ in list(norm.outputs[0].uses()):
        if not _cast_i32(use) or len(list(use.outputs[0].uses())) != 1:
            continue
        rq = next(iter(use.outputs[0].uses()))[0]
        if not _is(rq, "Requantize", ("lowbit",)) or rq.inputs[0] is not use.outputs[0]:
            continue
        consts = [None if v is None or v.const_value is None else v.const_value.numpy() for v in rq.inputs[1:4]]
        if any(c is None or c.size not in (1, C) for c in consts) or str(consts[2].dtype) not in _RANGE:
            continue
        return use, rq, [np.ascontiguousarray(np.broadcast_to(c.reshape(-1), (C,))) for c in consts]
    return None


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(arr))
    v.shape, v.type = ir.Shape(list(arr.shape)), ir.TensorType(ir.DataType.from_numpy(arr.dtype))
    graph.register_initializer(v)
    return v


def fuse_integer_norms(model: ir.Model) -> int:
    """Rewrite IntNorms with a residual add before or a Requantize after into ``IntNormFused``; returns the count."""
    graph, fused = model.graph, 0
    for norm in list(graph):
        if not _is(norm, "IntNorm", ("lowbit",)) or norm.outputs[0].shape is None or norm.outputs[0] in graph.outputs:
            continue
        C = norm.outputs[0].shape[-1]
        res = _residual(norm, graph)
        req = _requantize(norm, C) if isinstance(C, int) else None
        if res is None and req is None:
            continue
        base = norm.name or "norm"
        xs = [c.inputs[0] for c in res[1:]] if res else [norm.inputs[0], None]
        rq = req[2] if req else [np.zeros(C, np.int64), np.ones(C, np.int64), np.zeros(C, np.int8)]
        ins = [*xs, *norm.inputs[1:5], _const(graph, f"{base}.tvm_rb", rq[0].astype(np.int64)),
               _const(graph, f"{base}.tvm_rc", rq[1].astype(np.int64)), _const(graph, f"{base}.tvm_rz", rq[2])]
        new = ir.Node(DOMAIN, "IntNormFused", ins, name=f"{base}.tvm", num_outputs=2,
                      attributes=[*(ir.AttrInt64(k, a.as_int()) for k, a in norm.attributes.items()),
                                  ir.AttrInt64("requantize", int(req is not None))])
        graph.insert_before(norm, new)
        y = norm.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = y.shape, y.type
        ir.convenience.replace_all_uses_with(y, new.outputs[0])
        drop = [norm, *(res or [])]
        if req:
            out = req[1].outputs[0]
            new.outputs[1].shape, new.outputs[1].type = out.shape, out.type
            is_output = out in graph.outputs
            ir.convenience.replace_all_uses_with(out, new.outputs[1], replace_graph_outputs=True)
            if is_output:
                name, out.name = out.name, None
                new.outputs[1].name = name
            drop = [req[1], req[0], *drop]
        for node in drop:
            graph.remove(node, safe=True)
        fused += 1
    logger.debug("fuse_integer_norms: %d norms fused with their residual add / requantize", fused)
    return fused
