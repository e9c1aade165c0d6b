"""Integer attention as one TVM kernel: Q·Kᵀ, its Requantize, IntSoftmax, P·V and the context's Requantize.

:func:`fuse_integer_attention` (on the ONNX IR, before TVM's importer) rewrites the chain the
``integer-attention`` pass emits::

    MatMulInteger(q, kᵀ, zq, zk) → Requantize(b1, c1, z1) → IntSoftmax(table, keep)
      → MatMulInteger(·, v, zp, zv) → [Transpose | Reshape]* → Requantize(b2, c2, z2)
    ≡ IntAttention(q, kᵀ, v, keep, table, prm, rq) → [Transpose | Reshape]*

exact because Requantize is element-wise: with scalar b, c, zero point it commutes with any layout
ops; per channel (the context's channel = head·D + d, as ``migrate-steps`` leaves it) only with
Transpose(0, 2, 1, 3) → Reshape([B, S, H·D]), which is checked on the static shapes.  :func:`int_attention_cpu` computes, per (batch, head) and query row, the reference's
integers (``MatMulInteger`` in int32, ``requantize_reference``, ``int_softmax_reference``) without
writing the logits or the probabilities to memory.  With AVX-512 VNNI both products run on
``vpdpbusd`` (u8 × s8): the right operand is stored once per head as ``x − 128`` (int8), and

    Σ_k (a_k − za)(x_k − zx) = Σ_k a_k·(x_k − 128) + (128 − zx)·Σ_k a_k − za·Σ_k (x_k − zx)

holds in int32 (a ring identity: wrap-around included).  TVM is imported inside the functions only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["PRM", "fuse_integer_attention", "int_attention_cpu"]

logger = logging.getLogger(__name__)

DOMAIN = "lowbit.tvm"
PRM = ("zq", "zk", "zv", "zp", "b1", "c1", "z1")  # the int64 scalars the kernel reads; rq[3, H, D]: b2, c2, z2
_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def int_attention_cpu(H: int, M: int, L: int, D: int, logit_dtype: str, out_dtype: str, vnni: bool):
    """PrimFunc (Q[BH, M, D] u8, Kt[BH, D, L] u8, V[BH, L, D] u8, keep[BH, M, L] bool, table[256] i32,
    prm[7] i64 (:data:`PRM`), rq[3, H, D] i64) -> Y[BH, M, D] out_dtype (head of row t: t mod H).
    ``vnni`` needs L % 16 == D % 16 == 0."""
    from tvm.script import tirx as T

    lo1, hi1 = _RANGE[logit_dtype]
    lo2, hi2 = _RANGE[out_dtype]
    D4, L4 = D // 4, L // 4
    if vnni and (L % 16 or D % 16):
        raise ValueError(f"int_attention_cpu: VNNI needs L and D multiples of 16, got L={L}, D={D}")

    def vdot(acc, off, a4, packed, poff):  # acc[off:off+16] += 4-way dot(broadcast a4 (u8x4), packed (s8x64))
        acc[T.ramp(off, 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), acc.vload([off], "int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(a4, dtype="int32"), 16), dtype="uint8x64"),
            packed.vload([poff], "int8x64"), dtype="int32x16")

    vdot = T.macro(vdot)

    def requant(x, b, c, z, lo, hi):  # requantize_reference on one int32 value, as int64
        return T.max(T.min(T.shift_right(T.Cast("int64", x) * b + T.shift_left(T.int64(1), c - T.int64(1)), c) + z,
                           T.int64(hi)), T.int64(lo))

    @T.prim_func
    def int_attention(q: T.handle, kt: T.handle, v: T.handle, keep: T.handle, table: T.handle, prm: T.handle,
                      rq: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        BH = T.int64()
        Q = T.match_buffer(q, (BH, M, D), "uint8")
        Kt = T.match_buffer(kt, (BH, D, L), "uint8")
        V = T.match_buffer(v, (BH, L, D), "uint8")
        Kp = T.match_buffer(keep, (BH, M, L), "bool")
        Tb = T.match_buffer(table, (256,), "int32")
        P = T.match_buffer(prm, (7,), "int64")
        R = T.match_buffer(rq, (3, H, D), "int64")
        Y = T.match_buffer(y, (BH, M, D), out_dtype)
        for t in T.parallel(BH):
            ks = T.decl_buffer((D * L,), "int8")  # kᵀ − 128 as [D/4, L, 4]
            vs = T.decl_buffer((L * D,), "int8")  # v − 128 as [L/4, D, 4]
            colk = T.decl_buffer((L,), "int32")  # Σ_d (kᵀ[d, j] − zk)
            colv = T.decl_buffer((D,), "int32")  # Σ_j (v[j, d] − zv)
            lg = T.decl_buffer((L,), "int32")  # one row: logits, then their codes, then exp values
            pr = T.decl_buffer((L,), "uint8")  # one row of probabilities
            cx = T.decl_buffer((D,), "int32")  # one row of the context accumulator
            s = T.decl_buffer((4,), "int64")  # 0 max / Σa, 1 Σe, 2 ⌈log2 2S⌉, 3 multiplier
            for d, j in T.grid(D, L):
                ks[(d // 4) * L * 4 + j * 4 + d % 4] = T.Cast("int8", T.Cast("int32", Kt[t, d, j]) - 128)
            for j, d in T.grid(L, D):
                vs[(j // 4) * D * 4 + d * 4 + j % 4] = T.Cast("int8", T.Cast("int32", V[t, j, d]) - 128)
            for j in range(L):
                colk[j] = 0
            for d, j in T.grid(D, L):
                colk[j] = colk[j] + (T.Cast("int32", Kt[t, d, j]) - T.Cast("int32", P[1]))
            for d in range(D):
                colv[d] = 0
            for j, d in T.grid(L, D):
                colv[d] = colv[d] + (T.Cast("int32", V[t, j, d]) - T.Cast("int32", P[2]))
            for i in range(M):
                # logits = (q − zq)·(kᵀ − zk), in int32
                if vnni:
                    s[0] = T.int64(0)
                    for d in range(D):
                        s[0] = s[0] + T.Cast("int64", Q[t, i, d])
                    for j in T.vectorized(L):
                        lg[j] = (128 - T.Cast("int32", P[1])) * T.Cast("int32", s[0]) - T.Cast("int32", P[0]) * colk[j]
                    for d4 in range(D4):
                        for u in T.unroll(L // 16):
                            vdot(lg, u * 16, Q.vload([t, i, d4 * 4], "uint8x4"), ks, d4 * L * 4 + u * 64)
                else:
                    for j in T.vectorized(L):
                        lg[j] = 0
                    for d in range(D):
                        for j in T.vectorized(L):
                            lg[j] = lg[j] + (T.Cast("int32", Q[t, i, d]) - T.Cast("int32", P[0])) * (
                                T.Cast("int32", Kt[t, d, j]) - T.Cast("int32", P[1]))
                for j in T.vectorized(L):  # Requantize(b1, c1, z1): the logits' 8-bit codes
                    lg[j] = T.Cast("int32", requant(lg[j], P[4], P[5], P[6], lo1, hi1))
                # IntSoftmax: m = max over kept codes, e = table[m − x], p = ⌊(510·e + S) / 2S⌋
                s[0] = T.int64(-256)
                for j in range(L):
                    s[0] = T.max(s[0], T.if_then_else(Kp[t, i, j], T.Cast("int64", lg[j]), T.int64(-256)))
                s[1] = T.int64(0)
                for j in range(L):
                    lg[j] = T.if_then_else(Kp[t, i, j], Tb[T.max(T.min(T.Cast("int32", s[0]) - lg[j], 255), 0)],
                                           T.int32(0))
                    s[1] = s[1] + T.Cast("int64", lg[j])
                s[1] = T.max(s[1], T.int64(1))
                s[2] = T.int64(0)
                for k in range(33):
                    s[2] = s[2] + T.Cast("int64", T.shift_left(T.int64(1), T.int64(k)) < T.int64(2) * s[1])
                s[3] = T.floordiv(T.shift_left(T.int64(1), T.int64(31) + s[2]), T.int64(2) * s[1]) + T.int64(1)
                for j in T.vectorized(L):
                    pr[j] = T.Cast("uint8", T.shift_right((T.int64(510) * T.Cast("int64", lg[j]) + s[1]) * s[3],
                                                          T.int64(31) + s[2]))
                # context = (p − zp)·(v − zv), in int32, then Requantize(b2, c2, z2)
                if vnni:
                    s[0] = T.int64(0)
                    for j in range(L):
                        s[0] = s[0] + T.Cast("int64", pr[j])
                    for d in T.vectorized(D):
                        cx[d] = (128 - T.Cast("int32", P[2])) * T.Cast("int32", s[0]) - T.Cast("int32", P[3]) * colv[d]
                    for j4 in range(L4):
                        for u in T.unroll(D // 16):
                            vdot(cx, u * 16, pr.vload([j4 * 4], "uint8x4"), vs, j4 * D * 4 + u * 64)
                else:
                    for d in T.vectorized(D):
                        cx[d] = 0
                    for j in range(L):
                        for d in T.vectorized(D):
                            cx[d] = cx[d] + (T.Cast("int32", pr[j]) - T.Cast("int32", P[3])) * (
                                T.Cast("int32", V[t, j, d]) - T.Cast("int32", P[2]))
                for d in T.vectorized(D):
                    Y[t, i, d] = T.Cast(out_dtype, requant(cx[d], R[0, t % H, d], R[1, t % H, d], R[2, t % H, d], lo2, hi2))

    return int_attention


def _sole_use(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value in graph.outputs:
        return None
    return uses[0][0]


def _scalar(node: ir.Node, i: int, dtype: str | None = None) -> np.ndarray | None:
    """The constant scalar at input i (absent: a zero of ``dtype``), or None."""
    if len(node.inputs) <= i or node.inputs[i] is None:
        return None if dtype is None else np.zeros((), dtype)
    v = node.inputs[i].const_value
    arr = None if v is None else v.numpy()
    return arr if arr is not None and arr.size == 1 and (dtype is None or arr.dtype == np.dtype(dtype)) else None


def _is(node: ir.Node | None, op: str, lowbit: bool = False) -> bool:
    return node is not None and node.op_type == op and (node.domain == "lowbit" if lowbit else node.domain in ("", "ai.onnx"))


def _shape(value: ir.Value) -> list[int] | None:
    dims = list(value.shape) if value.shape is not None else None
    return dims if dims is not None and all(isinstance(d, int) for d in dims) else None


def _match(qk: ir.Node, graph: ir.Graph):
    """(nodes to remove, layout ops, prm scalars, rq [3, H, D], requantize 2) of one attention chain, or None."""
    r1 = _sole_use(qk.outputs[0], graph)
    sm = _sole_use(r1.outputs[0], graph) if _is(r1, "Requantize", True) else None
    pv = _sole_use(sm.outputs[0], graph) if _is(sm, "IntSoftmax", True) else None
    if not _is(pv, "MatMulInteger") or pv.inputs[0] is not sm.outputs[0] or len(sm.inputs) < 3 or sm.inputs[2] is None:
        return None
    layout, r2 = [], _sole_use(pv.outputs[0], graph)
    while r2 is not None and (_is(r2, "Transpose") or _is(r2, "Reshape")):
        layout.append(r2)
        r2 = _sole_use(r2.outputs[0], graph)
    if not _is(r2, "Requantize", True) or r2.inputs[0] is not (layout[-1] if layout else pv).outputs[0]:
        return None
    scalars = [_scalar(qk, 2, "uint8"), _scalar(qk, 3, "uint8"), _scalar(pv, 3, "uint8"), _scalar(pv, 2, "uint8"),
               *(_scalar(r1, i) for i in (1, 2, 3))]
    consts = [None if r2.inputs[i] is None or r2.inputs[i].const_value is None else r2.inputs[i].const_value.numpy()
              for i in (1, 2, 3)]
    q_shape = _shape(qk.inputs[0])
    if any(x is None for x in scalars + consts) or q_shape is None or len(q_shape) != 4 or str(scalars[6].dtype) not in (
            "int8", "uint8") or str(consts[2].dtype) not in _RANGE:
        return None
    if any(v.const_value is not None for v in (qk.inputs[0], qk.inputs[1], pv.inputs[1])):
        return None
    B, H, S, D = q_shape
    if any(c.size > 1 for c in consts):  # per channel: only the head-major merge of the context is understood
        perm = layout[0].attributes.get("perm") if layout and _is(layout[0], "Transpose") else None
        if (len(layout) != 2 or perm is None or list(perm.as_ints()) != [0, 2, 1, 3] or not _is(layout[1], "Reshape")
                or _shape(layout[1].outputs[0]) != [B, S, H * D] or any(c.size not in (1, H * D) for c in consts)):
            return None
    rq = np.stack([np.broadcast_to(c.astype(np.int64).reshape(-1), (H * D,)).reshape(H, D) for c in consts])
    return [qk, r1, sm, pv], layout, scalars, rq, r2


def fuse_integer_attention(model: ir.Model) -> int:
    """Rewrite every attention chain of the module docstring into ``lowbit.tvm::IntAttention``; returns the count."""
    graph, fused = model.graph, 0
    for qk in list(graph):
        if not _is(qk, "MatMulInteger") or len(qk.inputs) < 2 or qk.inputs[1] is None:
            continue
        found = _match(qk, graph)
        if found is None:
            continue
        chain, layout, scalars, rq, r2 = found
        sm, pv = chain[2], chain[3]
        base = qk.name or "attention"
        consts = []
        for suffix, arr in (("tvm_prm", np.array([int(x) for x in scalars], np.int64)), ("tvm_rq", rq)):
            c = ir.Value(name=f"{base}.{suffix}", const_value=ir.tensor(np.ascontiguousarray(arr)))
            c.shape, c.type = ir.Shape(list(arr.shape)), ir.TensorType(ir.DataType.INT64)
            graph.register_initializer(c)
            consts.append(c)
        out_dtype = r2.inputs[3].const_value.numpy().dtype
        new = ir.Node(DOMAIN, "IntAttention", [qk.inputs[0], qk.inputs[1], pv.inputs[1], sm.inputs[2], sm.inputs[1], *consts],
                      name=f"{base}.tvm_attention",
                      attributes=[ir.AttrString("logit_dtype", str(scalars[6].dtype)),
                                  ir.AttrString("out_dtype", str(out_dtype))])
        out_type = ir.TensorType(ir.DataType.from_numpy(out_dtype))
        new.outputs[0].shape, new.outputs[0].type = pv.outputs[0].shape, out_type
        graph.insert_before(pv, new)
        if layout:
            layout[0].replace_input_with(0, new.outputs[0])
        for node in layout:
            node.outputs[0].type = out_type
        last = layout[-1].outputs[0] if layout else new.outputs[0]
        is_output = r2.outputs[0] in graph.outputs
        ir.convenience.replace_all_uses_with(r2.outputs[0], last, replace_graph_outputs=True)
        if is_output:
            name, r2.outputs[0].name = r2.outputs[0].name, None
            last.name = name
        for node in [r2, *reversed(chain)]:
            graph.remove(node, safe=True)
        fused += 1
    logger.debug("fuse_integer_attention: %d attention chains fused", fused)
    return fused
