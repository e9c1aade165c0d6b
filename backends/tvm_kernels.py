"""Hand-scheduled TIR kernels for lowbit's low-bit matmuls (TVM imported lazily, by the caller).

``W[k, n] = (q[k, n] - z[k // bs, n]) * s[k // bs, n]``, ``Y = A @ W``; the codes come packed by
:func:`lowbit.backends.tvm_prepare.pack_nbits` (2, 4 or 8 bits).

* CPU (``layout="tiled"``): one parallel task per 64-lane output tile.  M == 1 (decode) streams the
  packed codes once: each k broadcasts a[k] against 64 unpacked lanes (shift/and on contiguous
  bytes, no gathers) and the zero point is applied once per group through
  ``sum_k a_k (q_k - z) = sum_k a_k q_k - z sum_k a_k``.  M > 1 dequantizes a [bs, 64] tile into an
  L1-resident float buffer once and reuses it for every row of A.
* CUDA (``layout="rows"``): a TE dequantize + matmul (codes [N, K*bits/32] u32) left unscheduled here;
  dlight's GEMV / Matmul rules schedule it (see ``tvm_lower.gpu_schedule``).
* int8: u8 x s8 -> int32 GEMM (exact) for MatMulInteger with a constant s8 weight, on AVX-512 VNNI
  (``vpdpbusd``) where the target has it.
"""

from __future__ import annotations

__all__ = ["TILE", "nbits_matmul_cpu", "nbits_matmul_te", "nbits_gemv_cuda", "gemv_cuda_config", "int8_matmul_cpu",
           "has_vnni"]

TILE = 64


def nbits_matmul_cpu(K: int, n_tiles: int, bits: int, block: int, unroll: int = 4):
    """PrimFunc (A[M, K] f32, W[n_tiles, K, 8*bits] u8, S, Z [n_tiles, K/block, 64] f32) -> Y[M, 64*n_tiles]."""
    from tvm.script import tirx as T

    if bits not in (2, 4, 8) or K % block:
        raise ValueError(f"nbits_matmul_cpu: bits={bits}, K={K}, block={block} not supported")
    G, NB, PER, MASK = K // block, TILE * bits // 8, 8 // bits, (1 << bits) - 1
    UK = unroll if block % unroll == 0 else 1
    NT = n_tiles

    @T.prim_func
    def nbits_matmul(a: T.handle, w: T.handle, s: T.handle, z: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a, (M, K), "float32")
        W = T.match_buffer(w, (NT, K, NB), "uint8")
        S = T.match_buffer(s, (NT, G, TILE), "float32")
        Z = T.match_buffer(z, (NT, G, TILE), "float32")
        O = T.match_buffer(o, (M, NT * TILE), "float32")
        if M == T.int64(1):
            for nt in T.parallel(NT):
                acc = T.decl_buffer((TILE,), "float32", scope="local")
                out = T.decl_buffer((TILE,), "float32", scope="local")
                asum = T.decl_buffer((1,), "float32", scope="local")
                for l in T.vectorized(TILE):
                    out[l] = T.float32(0)
                for g in range(G):
                    for l in T.vectorized(TILE):
                        acc[l] = T.float32(0)
                    asum[0] = T.float32(0)
                    for ko in range(block // UK):
                        for ku in T.unroll(UK):
                            for i in T.unroll(PER):
                                for j in T.vectorized(NB):
                                    acc[i * NB + j] = acc[i * NB + j] + A[0, g * block + ko * UK + ku] * T.Cast(
                                        "float32", T.bitwise_and(T.shift_right(
                                            W[nt, g * block + ko * UK + ku, j], T.uint8(i * bits)), T.uint8(MASK)))
                            asum[0] = asum[0] + A[0, g * block + ko * UK + ku]
                    for l in T.vectorized(TILE):
                        out[l] = out[l] + S[nt, g, l] * (acc[l] - Z[nt, g, l] * asum[0])
                for l in T.vectorized(TILE):
                    O[0, nt * TILE + l] = out[l]
        else:
            for nt in T.parallel(NT):
                wf = T.decl_buffer((block, TILE), "float32", scope="local")
                acc = T.decl_buffer((TILE,), "float32", scope="local")
                for g in range(G):
                    for kk in range(block):
                        for i in T.unroll(PER):
                            for j in T.vectorized(NB):
                                wf[kk, i * NB + j] = (T.Cast("float32", T.bitwise_and(T.shift_right(
                                    W[nt, g * block + kk, j], T.uint8(i * bits)), T.uint8(MASK)))
                                    - Z[nt, g, i * NB + j]) * S[nt, g, i * NB + j]
                    for m in range(M):
                        for l in T.vectorized(TILE):
                            acc[l] = T.float32(0)
                        for ko in range(block // UK):
                            for ku in T.unroll(UK):
                                for l in T.vectorized(TILE):
                                    acc[l] = acc[l] + A[m, g * block + ko * UK + ku] * wf[ko * UK + ku, l]
                        if g == 0:
                            for l in T.vectorized(TILE):
                                O[m, nt * TILE + l] = acc[l]
                        else:
                            for l in T.vectorized(TILE):
                                O[m, nt * TILE + l] = O[m, nt * TILE + l] + acc[l]

    return nbits_matmul


def nbits_matmul_te(a, w, s, z, K: int, N: int, bits: int, block: int, out_dtype: str = "float32"):
    """TE expression for the ``rows`` layout: a [..., K], w [N, K*bits/32] u32, s/z [N, K/block].

    Codes are read as 32-bit words (so that dlight's GEMV rule issues 4-byte loads per thread) and
    the reduction runs in float32 whatever the activation type, then casts to ``out_dtype``.
    """
    from tvm import te, tirx

    per, mask = 32 // bits, (1 << bits) - 1
    acc = "float32"
    dq = te.compute(
        (N, K),
        lambda n, k: ((tirx.Cast(acc, (w[n, k // per] >> tirx.Cast("uint32", (k % per) * bits))
                                 & tirx.const(mask, "uint32")) - z[n, k // block].astype(acc))
                      * s[n, k // block].astype(acc)),
        name="dequantize",
    )
    lead = list(a.shape[:-1])
    r = te.reduce_axis((0, K), name="k")
    y = te.compute(
        (*lead, N),
        lambda *idx: te.sum(a[(*idx[:-1], r)].astype(acc) * dq[idx[-1], r], axis=r),
        name="matmul",
    )
    if out_dtype == acc:
        return y
    return te.compute(y.shape, lambda *idx: y[idx].astype(out_dtype), name="cast")


def te_dtype_bytes(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]


def gemv_cuda_config(K: int, N: int, bits: int) -> tuple[int, int, int] | None:
    """(rows, warps, unroll_k) for :func:`nbits_gemv_cuda`, or None where the shape does not fit.

    Measured on the H100 (K=16384, N=28672, fp16): (2, 4, 4) reached 68 % of the bandwidth floor,
    (2, 8, 2) 65 %, (2, 4, 1) 66 %, dlight's GEMV 61 %.
    """
    if bits != 4 or K % 1024:
        return None
    uk = next(u for u in (4, 2, 1) if K % (1024 * u) == 0)
    for rows, warps in ((2, 4), (1, 4), (1, 2), (1, 1)):
        if N % (rows * warps) == 0:
            return rows, warps, uk
    return None


def nbits_gemv_cuda(K: int, N: int, bits: int, block: int, dtype: str = "float16", rows: int = 2,
                    warps: int = 4, unroll_k: int = 1):
    """Scheduled PrimFunc (a [1, K], w [N, K*bits/32] u32, s, z [N, K/block]) -> y [1, N] for CUDA.

    One warp per ``rows`` output rows; lane t of a warp owns 32 consecutive codes (one 16-byte
    load of 4 words per row) of every 1024-code chunk of K, accumulates them in float32 for each
    of its rows, and the warp finishes with a shuffle all-reduce (rfactor + cross-thread
    reduction).  ``a`` is read with 16-byte loads too; ``unroll_k`` chunks are in flight at once.
    """
    from tvm import te
    from tvm.s_tir import Schedule

    per_lane = 32
    if K % (32 * per_lane * unroll_k) or N % (rows * warps) or bits != 4:
        raise ValueError(f"nbits_gemv_cuda: K={K}, N={N}, bits={bits} do not fit the schedule")
    a = te.placeholder((1, K), dtype, name="a")
    w = te.placeholder((N, K * bits // 32), "uint32", name="w")
    s = te.placeholder((N, K // block), dtype, name="s")
    z = te.placeholder((N, K // block), dtype, name="z")
    y = nbits_matmul_te(a, w, s, z, K, N, bits, block, dtype)
    if y.op.name != "cast":  # float32 output: keep an epilogue stage so the accumulator stays local
        acc = y
        y = te.compute(acc.shape, lambda *i: acc(*i), name="cast")
    sch = Schedule(te.create_prim_func([a, w, s, z, y]))
    sch.compute_inline(sch.get_sblock("dequantize"))
    mm = sch.get_sblock("matmul")
    i, n, k = sch.get_loops(mm)
    ko, ku, tx, kv = sch.split(k, [None, unroll_k, 32, per_lane])
    bx, ty, nr = sch.split(n, [None, warps, rows])
    sch.reorder(i, bx, ty, tx, ko, ku, nr, kv)
    rf = sch.rfactor(tx, factor_axis=0)
    i, bx, ty, tx, ko, ku, nr, kv = sch.get_loops(rf)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(rf, 0, "local")

    def read_index(blk, name):
        return next(j for j, r in enumerate(sch.get(blk).reads) if r.source.name == name)

    wl = sch.cache_read(rf, read_index(rf, "w"), "local")
    sch.compute_at(wl, ku)
    sch.vectorize(sch.get_loops(wl)[-1])
    al = sch.cache_read(rf, read_index(rf, "a"), "local")
    sch.compute_at(al, ku)
    sch.vectorize(sch.split(sch.get_loops(al)[-1], [None, 16 // te_dtype_bytes(dtype)])[-1])
    for loop in (ku, nr, kv):
        sch.unroll(loop)
    sch.decompose_reduction(rf, ko)
    sch.reverse_compute_at(mm, ty)
    sch.set_scope(mm, 0, "local")
    lp = sch.get_loops(mm)
    if len(lp) > 4:
        sch.reorder(lp[4], lp[3])  # the cross-thread reduction loop must be innermost
    sch.bind(lp[3], "threadIdx.x")
    sch.reverse_compute_at(sch.get_sblock("cast"), ty)
    return sch.mod["main"].with_attr("tir.is_scheduled", True).with_attr("global_symbol", "nbits_gemv")


def int8_matmul_cpu(K: int, n_tiles: int, vnni: bool = True):
    """PrimFunc (A[M, K] u8, C[n_tiles, 64] i32, B[n_tiles, K/4, 64, 4] i8) -> Y[M, 64*n_tiles] i32.

    Y = A @ B - C: with C = a_zero_point * colsum(B) this is (A - a_zp) @ B, exactly.  Each
    64-lane tile keeps four int32x16 accumulators; with ``vnni`` every 4 consecutive k of a row
    of A are broadcast as one int32 and ``vpdpbusd`` (u8 x s8, 4-way dot product into int32)
    consumes the matching 64 bytes of B; without it, a plain vectorised multiply-add.
    """
    from tvm.script import tirx as T

    if K % 4:
        raise ValueError(f"int8_matmul_cpu: K={K} must be a multiple of 4")
    NT, K4 = n_tiles, K // 4

    @T.prim_func
    def int8_matmul_vnni(a: T.handle, c: T.handle, b: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a, (M, K), "uint8")
        C = T.match_buffer(c, (NT, TILE), "int32")
        B = T.match_buffer(b, (NT, K4, TILE, 4), "int8")
        O = T.match_buffer(o, (M, NT * TILE), "int32")
        for nt in T.parallel(NT):
            acc = T.decl_buffer((TILE,), "int32", scope="local")
            for m in range(M):
                for l in T.vectorized(TILE):
                    acc[l] = T.int32(0) - C[nt, l]
                for k4 in range(K4):
                    for j in T.unroll(4):
                        acc[T.ramp(j * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                            acc.vload([j * 16], "int32x16"),
                            T.reinterpret(T.broadcast(T.reinterpret(A.vload([m, k4 * 4], "uint8x4"), dtype="int32"),
                                                      16), dtype="uint8x64"),
                            B.vload([nt, k4, j * 16, 0], "int8x64"),
                            dtype="int32x16")
                for l in T.vectorized(TILE):
                    O[m, nt * TILE + l] = acc[l]

    @T.prim_func
    def int8_matmul(a: T.handle, c: T.handle, b: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        M = T.int64()
        A = T.match_buffer(a, (M, K), "uint8")
        C = T.match_buffer(c, (NT, TILE), "int32")
        B = T.match_buffer(b, (NT, K4, TILE, 4), "int8")
        O = T.match_buffer(o, (M, NT * TILE), "int32")
        for nt in T.parallel(NT):
            acc = T.decl_buffer((TILE,), "int32", scope="local")
            for m in range(M):
                for l in T.vectorized(TILE):
                    acc[l] = T.int32(0) - C[nt, l]
                for k4 in range(K4):
                    for kk in T.unroll(4):
                        for l in T.vectorized(TILE):
                            acc[l] = acc[l] + T.Cast("int32", A[m, k4 * 4 + kk]) * T.Cast("int32", B[nt, k4, l, kk])
                for l in T.vectorized(TILE):
                    O[m, nt * TILE + l] = acc[l]

    return int8_matmul_vnni if vnni else int8_matmul


def has_vnni(target) -> bool:
    """Whether an LLVM target has AVX-512 VNNI (vpdpbusd)."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx512vnni", target))
    except Exception:  # noqa: BLE001 - a target LLVM does not know: take the portable kernel
        return False


def nbits_gemv_module(K: int, N: int, bits: int, block: int, dtype: str = "float16"):
    """A Relax module ``main(a [1, K], w [N, K·bits/32] uint32, s, z [N, K/block]) -> [1, N]`` around
    :func:`nbits_matmul_te`, for compiling the GEMV on its own (tests, GPU benchmark)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, K), dtype))
    w = relax.Var("w", relax.TensorType((N, K * bits // 32), "uint32"))
    s = relax.Var("s", relax.TensorType((N, K // block), dtype))
    z = relax.Var("z", relax.TensorType((N, K // block), dtype))
    with bb.function("main", [a, w, s, z]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit_te(nbits_matmul_te, a, w, s, z, K, N, bits, block, dtype))
        bb.emit_func_output(y)
    return bb.get()
