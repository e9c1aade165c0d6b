"""TIR kernels of lowbit's integer ops: the int8 GEMM with the dyadic requantize in its epilogue,
the exp-table softmax and the run-time batched integer matmul (the integer norm is in
``tvm_integer_norm``, the fused attention in ``tvm_integer_attention``).

Each kernel computes exactly what the op's numpy reference computes (``lowbit.ops.integer_ops``,
``lowbit.ops.integer_nonlinear``), in integer arithmetic only:

* ``int8_matmul_requantize_cpu``: Y = sat_T(((A·W − C)·b + 2^(c−1)) >> c + zp) per output
  channel, with C = a_zp·colsum(W) − offset (the int32 offset the graph adds to the accumulator,
  folded: int32 addition wraps the same in either order).  The accumulator never leaves the
  registers: four int32x16 lanes per 64-column tile (``vpdpbusd`` where the target has AVX-512
  VNNI), widened to int64 for b·acc (|acc·b| < 2^61) and shifted arithmetically (= floor).
* ``int_softmax_cpu``: m = max over kept codes, e = table[m − x], y = ⌊(510·e + S) / 2S⌋.

TVM is imported inside the functions only.
"""

from __future__ import annotations

import logging

__all__ = ["TILE", "int8_matmul_requantize_cpu", "int_softmax_cpu", "lookup_cpu"]

logger = logging.getLogger(__name__)

TILE = 64
ROWS = 4  # rows of A per register block in the VNNI GEMM (4 rows × 4 int32x16 accumulators)


def int8_matmul_requantize_cpu(K: int, n_tiles: int, out_dtype: str, vnni: bool = True):
    """PrimFunc (A[M, K] u8, C[NT, 64] i32, B[NT, K/4, 64, 4] i8, b[NT·64] i64, c[NT·64] i64,
    zp[NT·64] T) -> Y[M, NT·64] T (T ∈ int8/uint8/int16), the requantized product."""
    from tvm.script import tirx as T

    if K % 4:
        raise ValueError(f"int8_matmul_requantize_cpu: K={K} must be a multiple of 4")
    lo, hi = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}[out_dtype]
    NT, K4, N = n_tiles, K // 4, n_tiles * TILE

    @T.macro
    def epilogue(acc, off, Bm, Cs, Z, O, m, nt):
        for l in T.vectorized(TILE):
            O[m, nt * TILE + l] = T.Cast(out_dtype, T.max(T.min(
                T.shift_right(T.Cast("int64", acc[off + l]) * Bm[nt * TILE + l]
                              + T.shift_left(T.int64(1), Cs[nt * TILE + l] - T.int64(1)), Cs[nt * TILE + l])
                + T.Cast("int64", Z[nt * TILE + l]), T.int64(hi)), T.int64(lo)))

    def dot(acc, row, k4, nt, A, B):  # acc[0:64] += A[row, 4·k4 : 4·k4+4] · B[nt, k4] (u8 × s8, 4-way)
        for j in T.unroll(4):
            acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                acc.vload([j * 16], "int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([row, k4 * 4], "uint8x4"), dtype="int32"), 16),
                              dtype="uint8x64"),
                B.vload([nt, k4, j * 16, 0], "int8x64"),
                dtype="int32x16")

    dot = T.macro(dot)

    @T.macro
    def init(acc, C, nt):
        for l in T.vectorized(TILE):
            acc[l] = T.int32(0) - C[nt, l]

    @T.prim_func
    def int8_matmul_requantize_vnni(a: T.handle, c: T.handle, b: T.handle, mb: T.handle, sc: T.handle,
                                    zp: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a, (M, K), "uint8")
        C = T.match_buffer(c, (NT, TILE), "int32")
        B = T.match_buffer(b, (NT, K4, TILE, 4), "int8")
        Bm = T.match_buffer(mb, (N,), "int64")
        Cs = T.match_buffer(sc, (N,), "int64")
        Z = T.match_buffer(zp, (N,), out_dtype)
        O = T.match_buffer(o, (M, N), out_dtype)
        for nt in T.parallel(NT):
            # one 256-byte "global" buffer per row: stack slots that LLVM keeps in zmm registers.  A "local"
            # buffer (or one of 1 KB or more) is a heap workspace on CPU, and every vpdpbusd result was stored to it.
            a0 = T.decl_buffer((TILE,), "int32")
            a1 = T.decl_buffer((TILE,), "int32")
            a2 = T.decl_buffer((TILE,), "int32")
            a3 = T.decl_buffer((TILE,), "int32")
            for mo in range(M // ROWS):  # ROWS rows at once: each 64-byte slice of B feeds ROWS vpdpbusd
                init(a0, C, nt)
                init(a1, C, nt)
                init(a2, C, nt)
                init(a3, C, nt)
                for k4 in range(K4):
                    dot(a0, mo * ROWS, k4, nt, A, B)
                    dot(a1, mo * ROWS + 1, k4, nt, A, B)
                    dot(a2, mo * ROWS + 2, k4, nt, A, B)
                    dot(a3, mo * ROWS + 3, k4, nt, A, B)
                epilogue(a0, 0, Bm, Cs, Z, O, mo * ROWS, nt)
                epilogue(a1, 0, Bm, Cs, Z, O, mo * ROWS + 1, nt)
                epilogue(a2, 0, Bm, Cs, Z, O, mo * ROWS + 2, nt)
                epilogue(a3, 0, Bm, Cs, Z, O, mo * ROWS + 3, nt)
            for m in range(M // ROWS * ROWS, M):  # the remaining rows one at a time
                init(a0, C, nt)
                for k4 in range(K4):
                    dot(a0, m, k4, nt, A, B)
                epilogue(a0, 0, Bm, Cs, Z, O, m, nt)

    @T.prim_func
    def int8_matmul_requantize(a: T.handle, c: T.handle, b: T.handle, mb: T.handle, sc: T.handle,
                               zp: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a, (M, K), "uint8")
        C = T.match_buffer(c, (NT, TILE), "int32")
        B = T.match_buffer(b, (NT, K4, TILE, 4), "int8")
        Bm = T.match_buffer(mb, (N,), "int64")
        Cs = T.match_buffer(sc, (N,), "int64")
        Z = T.match_buffer(zp, (N,), out_dtype)
        O = T.match_buffer(o, (M, N), out_dtype)
        for nt in T.parallel(NT):
            acc = T.decl_buffer((TILE,), "int32")  # "global": a stack slot
            for m in range(M):
                init(acc, C, nt)
                for k4 in range(K4):
                    for kk in T.unroll(4):
                        for l in T.vectorized(TILE):
                            acc[l] = acc[l] + T.Cast("int32", A[m, k4 * 4 + kk]) * T.Cast("int32", B[nt, k4, l, kk])
                epilogue(acc, 0, Bm, Cs, Z, O, m, nt)

    return int8_matmul_requantize_vnni if vnni else int8_matmul_requantize


def lookup_cpu(N: int, n_tables: int, x_dtype: str, t_dtype: str):
    """PrimFunc (X[R, N] x_dtype, table[n_tables·256] t_dtype) -> Y[R, N] t_dtype: lowbit.Lookup,
    Y[r, n] = table[256·n + X[r, n] − min(x_dtype)] (one table for every channel when n_tables = 1).
    Reads the codes directly: no int32 index tensor is formed."""
    from tvm.script import tirx as T

    lo = {"int8": -128, "uint8": 0}[x_dtype]
    per_channel = n_tables > 1
    if per_channel and n_tables != N:
        raise ValueError(f"lookup_cpu: {n_tables} tables for {N} channels")

    @T.prim_func
    def lookup(x: T.handle, table: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})  # opaque: not fused with reshapes
        R = T.int64()
        X = T.match_buffer(x, (R, N), x_dtype)
        Tb = T.match_buffer(table, (n_tables * 256,), t_dtype)
        Y = T.match_buffer(y, (R, N), t_dtype)
        for r in T.parallel(R):
            for n in range(N):
                Y[r, n] = Tb[T.Cast("int32", X[r, n]) - lo + (T.Cast("int32", n) * 256 if per_channel else 0)]

    return lookup


def int_softmax_cpu(L: int, x_dtype: str):
    """PrimFunc (X[R, L] x_dtype, table[256] i32, keep[R, L] bool) -> Y[R, L] u8: lowbit.IntSoftmax.

    The per-element division ⌊n / 2S⌋ (0 ≤ n < 2^31) is a multiply and a shift by the row's constant
    (Granlund & Montgomery 1994, Thm 4.2): with l = ⌈log2 d⌉ and m = ⌊2^(31+l) / d⌋ + 1,
    2^(31+l) < m·d ≤ 2^(31+l) + 2^l, hence ⌊n / d⌋ = ⌊n·m / 2^(31+l)⌋ exactly; n·m < 2^63.
    """
    from tvm.script import tirx as T

    @T.prim_func
    def int_softmax(x: T.handle, table: T.handle, keep: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        R = T.int64()
        X = T.match_buffer(x, (R, L), x_dtype)
        Tb = T.match_buffer(table, (256,), "int32")
        Kp = T.match_buffer(keep, (R, L), "bool")
        Y = T.match_buffer(y, (R, L), "uint8")
        for r in T.parallel(R):
            e = T.decl_buffer((L,), "int32")
            s = T.decl_buffer((4,), "int64")  # 0 max, 1 Σe, 2 ⌈log2 2S⌉, 3 multiplier
            s[0] = T.int64(-256)
            for j in range(L):
                s[0] = T.max(s[0], T.if_then_else(Kp[r, j], T.Cast("int64", X[r, j]), T.int64(-256)))
            s[1] = T.int64(0)
            for j in range(L):
                e[j] = T.if_then_else(Kp[r, j], Tb[T.max(T.min(T.Cast("int32", s[0]) - T.Cast("int32", X[r, j]), 255),
                                                         0)], T.int32(0))
                s[1] = s[1] + T.Cast("int64", e[j])
            s[1] = T.max(s[1], T.int64(1))
            s[2] = T.int64(0)
            for k in range(33):
                s[2] = s[2] + T.Cast("int64", T.shift_left(T.int64(1), T.int64(k)) < T.int64(2) * s[1])
            s[3] = T.floordiv(T.shift_left(T.int64(1), T.int64(31) + s[2]), T.int64(2) * s[1]) + T.int64(1)
            for j in T.vectorized(L):
                Y[r, j] = T.Cast("uint8", T.shift_right((T.int64(510) * T.Cast("int64", e[j]) + s[1]) * s[3],
                                                        T.int64(31) + s[2]))

    return int_softmax


def int_batch_matmul_cpu(batch: int, M: int, K: int, N: int, a_dtype: str, b_dtype: str):
    """PrimFunc (A[batch, M, K], B[batch, K, N], za[1], zb[1]) -> Y[batch, M, N] i32 = (A − za) @ (B − zb),
    exact in int32 (ONNX MatMulInteger with scalar zero points, both operands computed at run time:
    attention's Q·Kᵀ and P·V).  One row of Y per parallel task, vectorized over N."""
    from tvm.script import tirx as T

    @T.prim_func
    def int_batch_matmul(a: T.handle, b: T.handle, za: T.handle, zb: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        A = T.match_buffer(a, (batch, M, K), a_dtype)
        B = T.match_buffer(b, (batch, K, N), b_dtype)
        ZA = T.match_buffer(za, (1,), a_dtype)
        ZB = T.match_buffer(zb, (1,), b_dtype)
        Y = T.match_buffer(y, (batch, M, N), "int32")
        for bm in T.parallel(batch * M):
            acc = T.decl_buffer((N,), "int32")
            for n in T.vectorized(N):
                acc[n] = T.int32(0)
            for k in range(K):
                for n in T.vectorized(N):
                    acc[n] = acc[n] + (T.Cast("int32", A[bm // M, bm % M, k]) - T.Cast("int32", ZA[0])) * (
                        T.Cast("int32", B[bm // M, k, n]) - T.Cast("int32", ZB[0]))
            for n in T.vectorized(N):
                Y[bm // M, bm % M, n] = acc[n]

    return int_batch_matmul
