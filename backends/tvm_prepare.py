"""Rewrite an ONNX graph into the form lowbit's TVM importer reads.

TVM 0.27's ONNX frontend cannot read int4/int2 initializers, blocked DequantizeLinear or
``com.microsoft.MatMulNBits``.  This step, run on a copy of the model before import, turns each
low-bit weight matmul into one ``lowbit.tvm::NBitsMatMul`` node whose weights are already in the
layout of the TIR kernel that will run it (``backends/tvm_kernels.py``):

* ``MatMulNBits(A, B, scales, zp)``  (unsigned codes q, zero point z, per-block scale s)
* ``MatMul(A, DequantizeLinear(Q, s, z, block_size=bs, axis=0))`` with Q of [K, N] in
  int2/uint2/int4/uint4/int8/uint8 — signed codes are shifted by 2^(b-1), which is exact:
  (q + 2^(b-1)) - (z + 2^(b-1)) = q - z.

Both compute ``A @ W`` with ``W[k, n] = (q[k, n] - z[k // bs, n]) * s[k // bs, n]``.  A blocked or
int4/int2 DequantizeLinear that feeds anything else is folded into a float32 initializer (it is a
constant).  Anything the importer cannot read raises :class:`LowbitError` naming the node.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError

__all__ = ["prepare_for_tvm", "pack_nbits", "NBITS_DOMAIN", "TILE"]

logger = logging.getLogger(__name__)

NBITS_DOMAIN = "lowbit.tvm"
TILE = 64  # output lanes per tile in the CPU layout
_LOW_BIT = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False), ir.DataType.INT2: (2, True),
            ir.DataType.UINT2: (2, False), ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False)}
# Standard ops plus the contrib ops with converters in tvm_convert.py.
_FOREIGN_OK = {("com.microsoft", "MatMulNBits"), (NBITS_DOMAIN, "NBitsMatMul"), (NBITS_DOMAIN, "Int8MatMul")}
_FOREIGN_OK |= {("lowbit", op) for op in ("Requantize", "Lookup", "IntNorm", "IntSoftmax")}  # tvm_integer.py (CPU)


def pack_nbits(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, layout: str):
    """Pack unsigned codes ``q`` [K, N] with per-group ``scale``/``zero`` [G, N] for a kernel.

    ``layout="rows"`` (GPU): codes [N, K*bits/32] uint32, each word holding 32/bits consecutive k,
    low bits first (little-endian bytes); scales and zeros [N, G].  ``layout="tiled"`` (CPU): N padded to a multiple of TILE,
    codes [N/TILE, K, TILE*bits/8] where byte j of row (t, k) holds lanes j + i*TILE*bits/8 at bit
    offset i*bits; scales and zeros [N/TILE, G, TILE].  Zeros are returned as float32.
    """
    K, N = q.shape
    per = 8 // bits
    q = q.astype(np.uint8)
    if layout == "rows":
        qt = q.T.reshape(N, K // per, per)
        packed = np.zeros((N, K // per), np.uint8)
        for i in range(per):
            packed |= (qt[:, :, i] << (i * bits)).astype(np.uint8)
        if packed.shape[1] % 4:
            raise LowbitError(f"rows layout: K*bits/8 = {packed.shape[1]} bytes is not a whole number of 32-bit words")
        words = np.ascontiguousarray(packed).view("<u4")
        return words, np.ascontiguousarray(scale.T, np.float32), np.ascontiguousarray(zero.T, np.float32)
    if layout != "tiled":
        raise ValueError(f"unknown layout {layout!r}")
    NT = -(-N // TILE)
    pad = NT * TILE - N
    qp = np.pad(q, ((0, 0), (0, pad))).reshape(K, NT, per, TILE // per)  # lane = i*(TILE/per) + j
    packed = np.zeros((K, NT, TILE // per), np.uint8)
    for i in range(per):
        packed |= (qp[:, :, i, :] << (i * bits)).astype(np.uint8)
    G = scale.shape[0]
    sp = np.pad(scale.astype(np.float32), ((0, 0), (0, pad))).reshape(G, NT, TILE).transpose(1, 0, 2)
    zp = np.pad(zero.astype(np.float32), ((0, 0), (0, pad))).reshape(G, NT, TILE).transpose(1, 0, 2)
    return (np.ascontiguousarray(packed.transpose(1, 0, 2)), np.ascontiguousarray(sp), np.ascontiguousarray(zp))


def _const(value: ir.Value | None, node: ir.Node, what: str) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        raise LowbitError(f"node '{node.name}' ({node.op_type}): {what} must be an initializer for the TVM backend",
                          hint="only constant low-bit weights are supported")
    arr = tensor.numpy()
    if tensor.dtype in _LOW_BIT and tensor.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        arr = arr.astype(np.int8 if _LOW_BIT[tensor.dtype][1] else np.uint8)
    return arr


def _unpack_matmulnbits(node: ir.Node):
    a = node.attributes
    K, N, bits, bs = (a["K"].as_int(), a["N"].as_int(), a["bits"].as_int(), a["block_size"].as_int())
    ins = list(node.inputs) + [None] * (6 - len(node.inputs))
    if bits not in (2, 4, 8):
        raise LowbitError(f"node '{node.name}' (MatMulNBits): bits={bits} is not supported by the TVM backend",
                          hint="use 2, 4 or 8 bits")
    if ins[4] is not None:
        raise LowbitError(f"node '{node.name}' (MatMulNBits): g_idx (act-order) is not supported by the TVM backend")
    if K % bs:
        raise LowbitError(f"node '{node.name}' (MatMulNBits): K={K} is not a multiple of block_size={bs}")
    G = K // bs
    B = _const(ins[1], node, "B").reshape(N, G, bs * bits // 8)
    per = 8 // bits
    codes = np.stack([(B >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], axis=-1).reshape(N, K)
    scale = _const(ins[2], node, "scales").reshape(N, G).astype(np.float32)
    zp = _const(ins[3], node, "zero_points")
    if zp is None:
        zero = np.full((N, G), 1 << (bits - 1), np.float32)
    elif zp.dtype == np.uint8:
        zb = zp.reshape(N, -1)
        zero = np.stack([(zb >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], axis=-1).reshape(N, -1)[:, :G]
    else:
        raise LowbitError(f"node '{node.name}' (MatMulNBits): float zero points are not supported by the TVM backend")
    return codes.T, scale.T, zero.T.astype(np.float32), bits, bs, ins[5]


def _unpack_blocked_dq(node: ir.Node):
    x = node.inputs[0].const_value
    bits, signed = _LOW_BIT[x.dtype]
    q = _const(node.inputs[0], node, "x").astype(np.int32)
    scale = _const(node.inputs[1], node, "x_scale").astype(np.float32)
    zp = _const(node.inputs[2] if len(node.inputs) > 2 else None, node, "x_zero_point")
    K, N = q.shape
    bs = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    if bs == 0:  # per-column (axis 1) int4/int2: one group spanning K
        if scale.ndim != 1 or axis not in (1, -1):
            return None
        bs, scale = K, scale.reshape(1, N)
        zp = None if zp is None else zp.reshape(1, N)
    elif axis != 0 or scale.shape != (K // bs, N) or K % bs:
        return None
    zero = np.zeros_like(scale, np.int32) if zp is None else zp.astype(np.int32)
    off = (1 << (bits - 1)) if signed else 0
    return (q + off), scale, (zero + off).astype(np.float32), bits, bs


def _fold_dq(node: ir.Node) -> np.ndarray:
    q = _const(node.inputs[0], node, "x").astype(np.float32)
    scale = _const(node.inputs[1], node, "x_scale").astype(np.float32)
    zp = _const(node.inputs[2] if len(node.inputs) > 2 else None, node, "x_zero_point")
    zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
    bs = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    axis %= max(q.ndim, 1)
    if bs:
        scale, zp = (np.repeat(t, bs, axis=axis).take(range(q.shape[axis]), axis=axis) for t in (scale, zp))
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def _replace(graph: ir.Graph, node: ir.Node, a: ir.Value, codes, scale, zero, bits, bs, bias, layout, out: ir.Value):
    K, N = codes.shape
    ops = None
    if layout == "lowbit-cpu":  # lowbit's C kernels (backends/kernels), where they run the format
        from .kernels.tvm_bridge import kernel_operands

        ops = kernel_operands(codes, scale, zero, bits, bs)
        if ops is None:
            layout, bits = "tiled", 4 if bits == 3 else bits  # 3-bit codes fit the 4-bit TIR kernel exactly
    if ops is None and bits == 3:
        bits = 4  # the TIR kernels have no 3-bit layout; 3-bit codes are exact 4-bit codes
    packed, s, z = ops if ops is not None else pack_nbits(codes, scale, zero, bits, layout)
    base = node.name or "nbits"
    inits = []
    for suffix, arr in (("qweight", packed), ("scales", s), ("zeros", z)):
        v = ir.Value(name=f"{base}.tvm_{suffix}", const_value=ir.tensor(arr))
        v.shape, v.type = ir.Shape(arr.shape), ir.TensorType(ir.DataType.from_numpy(arr.dtype))
        graph.register_initializer(v)
        inits.append(v)
    inputs = [a, *inits] + ([bias] if bias is not None else [])
    new = ir.Node(NBITS_DOMAIN, "NBitsMatMul", inputs, name=f"{base}.tvm",
                  attributes=[ir.AttrInt64("K", K), ir.AttrInt64("N", N), ir.AttrInt64("bits", bits),
                              ir.AttrInt64("block_size", bs), ir.AttrString("layout", layout)])
    new.outputs[0].name = None
    graph.insert_before(node, new)
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    is_output = out in graph.outputs
    ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
    if is_output:
        name, out.name = out.name, None
        new.outputs[0].name = name
    return new


def _int8_matmul(graph: ir.Graph, node: ir.Node) -> bool:
    """MatMulInteger(a u8, W s8 const [K, N], a_zp scalar[, b_zp == 0]) -> lowbit.tvm::Int8MatMul
    with W as [N/64, K/4, 64, 4] and the zero-point term a_zp * colsum(W) precomputed (exact)."""
    ins = list(node.inputs) + [None] * (4 - len(node.inputs))
    a, b, azp, bzp = ins
    wt = b.const_value if b is not None else None
    a_dtype = a.dtype
    if a_dtype is None and a.producer() is not None and a.producer().op_type == "Cast":
        a_dtype = ir.DataType(a.producer().attributes["to"].as_int())
    if wt is None or wt.dtype != ir.DataType.INT8 or len(wt.shape) != 2 or a_dtype != ir.DataType.UINT8:
        return False
    if azp is not None and (azp.const_value is None or azp.const_value.numpy().size != 1):
        return False
    if bzp is not None and (bzp.const_value is None or np.any(bzp.const_value.numpy() != 0)):
        return False
    w = wt.numpy()
    K, N = w.shape
    if K % 4:
        return False
    NT = -(-N // TILE)
    wp = np.pad(w, ((0, 0), (0, NT * TILE - N)))
    tiled = np.ascontiguousarray(wp.reshape(K // 4, 4, NT, TILE).transpose(2, 0, 3, 1))  # [NT, K/4, 64, 4]
    za = 0 if azp is None else int(azp.const_value.numpy().reshape(()))
    corr = (za * wp.astype(np.int64).sum(axis=0)).astype(np.int32).reshape(NT, TILE)
    base = node.name or "int8_matmul"
    vals = []
    for suffix, arr in (("qweight", tiled), ("zero_point_correction", corr)):
        v = ir.Value(name=f"{base}.tvm_{suffix}", const_value=ir.tensor(arr))
        v.shape, v.type = ir.Shape(arr.shape), ir.TensorType(ir.DataType.from_numpy(arr.dtype))
        graph.register_initializer(v)
        vals.append(v)
    new = ir.Node(NBITS_DOMAIN, "Int8MatMul", [a, vals[1], vals[0]], name=f"{base}.tvm",
                  attributes=[ir.AttrInt64("K", K), ir.AttrInt64("N", N)])
    out = node.outputs[0]
    new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
    graph.insert_before(node, new)
    is_output = out in graph.outputs
    ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
    if is_output:
        name, out.name = out.name, None
        new.outputs[0].name = name
    graph.remove(node, safe=True)
    return True


def prepare_for_tvm(model: ir.Model, layout: str = "tiled", kernels: str | None = None) -> dict[str, int]:
    """Rewrite ``model`` in place (see module docstring); returns counts of what changed.  ``kernels=
    "lowbit-cpu"`` (CPU only) runs low-bit linears, 3-bit ``lowbit.MatMul3Bit`` included, on lowbit's C
    kernels (``backends/kernels``) instead of TIR."""
    graph = model.graph
    stats = {"matmulnbits": 0, "blocked_dq_matmul": 0, "folded_dq": 0, "int8_matmul": 0}
    wlayout = "lowbit-cpu" if kernels == "lowbit-cpu" and layout == "tiled" else layout
    for node in list(graph):
        dom = node.domain or ""
        if dom in ("", "ai.onnx"):
            pass
        elif (dom, node.op_type) == ("lowbit", "MatMul3Bit"):  # lowbit-cpu: 3-bit kernels; TIR: as 4-bit codes
            from .kernels.tvm_bridge import matmul3bit_operands

            codes, scale, zero, bits, bs, _ = matmul3bit_operands(node)
            _replace(graph, node, node.inputs[0], codes, scale, zero, bits, bs, None, wlayout, node.outputs[0])
            graph.remove(node, safe=True)
            stats["matmul3bit"] = stats.get("matmul3bit", 0) + 1
            continue
        elif (dom, node.op_type) == ("lowbit", "MatMulGrid"):  # grid form: a float weight (expand_grid.py)
            from .expand_grid import fold_matmul_grid

            fold_matmul_grid(graph, node)
            stats["matmul_grid"] = stats.get("matmul_grid", 0) + 1
            continue
        elif (dom, node.op_type) not in _FOREIGN_OK:
            raise LowbitError(f"node '{node.name}': op {dom}::{node.op_type} has no TVM lowering",
                              hint="lower it with the ORT backend, or file an issue for a TVM converter")
        if node.op_type == "MatMulInteger" and dom in ("", "ai.onnx") and layout == "tiled":
            stats["int8_matmul"] += _int8_matmul(graph, node)
        elif (dom, node.op_type) == ("com.microsoft", "MatMulNBits"):
            codes, scale, zero, bits, bs, bias = _unpack_matmulnbits(node)
            _replace(graph, node, node.inputs[0], codes, scale, zero, bits, bs, bias, wlayout, node.outputs[0])
            graph.remove(node, safe=True)
            stats["matmulnbits"] += 1
        elif node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            dtype = node.inputs[0].const_value.dtype
            blocked = "block_size" in node.attributes and node.attributes["block_size"].as_int() > 0
            if not blocked and dtype in (ir.DataType.INT8, ir.DataType.UINT8):
                continue  # TVM's own converter reads these
            if dtype not in _LOW_BIT:
                raise LowbitError(f"node '{node.name}' (DequantizeLinear): {dtype} weights are not supported "
                                  "by the TVM backend")
            uses = list(node.outputs[0].uses())
            done = False
            if len(uses) == 1 and uses[0].node.op_type == "MatMul" and uses[0].idx == 1 \
                    and node.inputs[0].const_value.shape.rank() == 2:
                unpacked = _unpack_blocked_dq(node)
                if unpacked is not None:
                    mm = uses[0].node
                    _replace(graph, mm, mm.inputs[0], *unpacked, None, wlayout, mm.outputs[0])
                    graph.remove([mm, node], safe=True)
                    stats["blocked_dq_matmul"] += 1
                    done = True
            if not done:
                w = _fold_dq(node)
                v = ir.Value(name=f"{node.name or 'dq'}.folded", const_value=ir.tensor(w))
                v.shape, v.type = ir.Shape(w.shape), ir.TensorType(ir.DataType.FLOAT)
                graph.register_initializer(v)
                ir.convenience.replace_all_uses_with(node.outputs[0], v)
                graph.remove(node, safe=True)
                stats["folded_dq"] += 1
    for name, value in list(graph.initializers.items()):  # the rewritten weights' originals
        if not value.uses() and value not in graph.outputs:
            del graph.initializers[name]
            stats["removed_initializers"] = stats.get("removed_initializers", 0) + 1
    if any(n.domain == NBITS_DOMAIN for n in graph) and not any(k == NBITS_DOMAIN for k in model.opset_imports):
        model.opset_imports[NBITS_DOMAIN] = 1
    logger.debug("prepare_for_tvm: %s", stats)
    return stats
