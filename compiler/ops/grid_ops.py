"""``lowbit.MatMulGrid``: a matmul whose weight is stored as per-group grid codes (mixture of data types).

``MatMulGrid(X[..., K], codes uint8 [M·bits/8], types [G, 1, N] uint2, scales [G, 1, N] float,
grid [T·2^bits] float; bits) → Y[..., N]``::

    c = unpack(codes)            # G·g·N codes of `bits` bits, in [G, g, N] order, 8 codes per `bits` bytes
    W[G, g, N] = grid[types · 2^bits + c] · scales,   W ← reshape(W, [G·g, N])[:K],   Y = X·W

Packing: every 8 consecutive codes form one little-endian word of ``bits`` bytes,
``word = Σ_i c_i · 2^(bits·i)``, written as ``bits`` bytes, low byte first (3 bits: 8 codes in 3
bytes, as ``lowbit.MatMul3Bit`` packs them).  Each (group, column) reads its ``2^bits`` levels from row
``types`` of the grid table; K is padded to whole groups and the padding rows are dropped.  This is the
storage form of ``quantize-weights{dtype=mod}`` (:mod:`lowbit.quant.mod`).  The function body unpacks
with integer Mul/ReduceSum/Div/Mod and gathers from the table, so any ONNX runtime at opset ≥ 25
(UINT2 grid indices) runs it; on constant inputs ONNX Runtime folds the weight once at session creation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowbit.ops.registry import DOMAIN, lowbit_op

__all__ = ["matmul_grid_reference", "pack_codes", "unpack_codes"]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (any shape, values < 2^bits) → uint8 ``[⌈n/8⌉·bits]``, 8 codes per ``bits``-byte word."""
    c = np.zeros(-(-codes.size // 8) * 8, np.uint64)
    c[:codes.size] = np.asarray(codes).reshape(-1)
    if codes.size and c.max() >= 1 << bits:
        raise ValueError(f"codes must be below 2^{bits}")
    word = (c.reshape(-1, 8) << (bits * np.arange(8, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    out = np.stack([(word >> np.uint64(8 * j)) & np.uint64(0xFF) for j in range(bits)], axis=1)
    return out.astype(np.uint8).reshape(-1)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of :func:`pack_codes`' bytes (int64)."""
    b = np.asarray(packed, np.uint64).reshape(-1, bits)
    word = (b << (np.uint64(8) * np.arange(bits, dtype=np.uint64))).sum(axis=1, dtype=np.uint64)
    c = (word[:, None] >> (np.uint64(bits) * np.arange(8, dtype=np.uint64))) & np.uint64((1 << bits) - 1)
    return c.reshape(-1)[:count].astype(np.int64)


def _attr_const(out: str, attr: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
    return node


def _matmul_grid_function(opset: int = 25) -> onnx.FunctionProto:
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr))  # noqa: E731
    mk = helper.make_node
    nodes = [
        c("c_zero", np.array([0], np.int64)), c("c_zs", np.array(0, np.int64)), c("c_one", np.array(1, np.int64)),
        c("c_m1", np.array([-1], np.int64)), c("c_eight", np.array(8, np.int64)), c("c_two", np.array(2, np.int64)),
        c("c_256", np.array(256, np.int64)), _attr_const("bits0", "bits"), _attr_const("grp0", "group"),
        mk("Range", ["c_zs", "bits0", "c_one"], ["j"]),  # 0..bits-1
        mk("Pow", ["c_256", "j"], ["byte_w"]),  # 256^j
        mk("Range", ["c_zs", "c_eight", "c_one"], ["i"]),  # 0..7
        mk("Pow", ["c_two", "bits0"], ["levels"]),  # 2^bits
        mk("Pow", ["levels", "i"], ["code_w"]),  # 2^(bits·i)
        mk("Unsqueeze", ["bits0", "c_zero"], ["bits1"]),
        mk("Concat", ["c_m1", "bits1"], ["word_shape"], axis=0),
        mk("Cast", ["codes"], ["b64"], to=TensorProto.INT64),
        mk("Reshape", ["b64", "word_shape"], ["bw"]),
        mk("Mul", ["bw", "byte_w"], ["bw2"]),
        mk("ReduceSum", ["bw2", "c_m1"], ["word"], keepdims=1),
        mk("Div", ["word", "code_w"], ["shifted"]),
        mk("Mod", ["shifted", "levels"], ["c8"]),
        mk("Reshape", ["c8", "c_m1"], ["flat"]),
        mk("Shape", ["scales"], ["g0"], start=0, end=1),
        mk("Unsqueeze", ["grp0", "c_zero"], ["grp1"]),
        mk("Shape", ["scales"], ["n"], start=-1),
        mk("Concat", ["g0", "grp1", "n"], ["shape3"], axis=0),
        mk("ReduceProd", ["shape3"], ["count"], keepdims=1),
        mk("Slice", ["flat", "c_zero", "count"], ["codes_flat"]),
        mk("Reshape", ["codes_flat", "shape3"], ["codes3"]),
        mk("DequantizeLinear", ["types", "f_one"], ["tf"]),
        c("f_one", np.array(1.0, np.float32)),
        mk("Cast", ["tf"], ["t64"], to=TensorProto.INT64),
        mk("Mul", ["t64", "levels"], ["toff"]),
        mk("Add", ["codes3", "toff"], ["idx"]),
        mk("Gather", ["grid", "idx"], ["levels_v"]),
        mk("Mul", ["levels_v", "scales"], ["w3"]),
        mk("Concat", ["c_m1", "n"], ["shape2"], axis=0),
        mk("Reshape", ["w3", "shape2"], ["w2"]),
        mk("Shape", ["X"], ["k"], start=-1),
        mk("Slice", ["w2", "c_zero", "k", "c_zero"], ["W"]),
        mk("MatMul", ["X", "W"], ["Y"]),
    ]
    # Constants first (a function body must be topologically sorted)
    nodes = [n for n in nodes if n.op_type == "Constant"] + [n for n in nodes if n.op_type != "Constant"]
    return helper.make_function(DOMAIN, "MatMulGrid", ["X", "codes", "types", "scales", "grid"], ["Y"], nodes,
                                [helper.make_opsetid("", max(opset, 25))], attributes=["bits", "group"])


@lowbit_op("MatMulGrid", doc="Y = X·W, W = reshape(grid[types·2^bits + c]·scales, [G·g, N])[:K] with c the "
           "G·g·N codes of `bits` bits unpacked from `codes` (8 per `bits`-byte word) in [G, g=group, N] order: "
           "per-group grid codes (mixture of data types), K padded to whole groups.",
           inputs=[("X", "T"), ("codes", "tensor(uint8)"), ("types", "tensor(uint2)"), ("scales", "T"), ("grid", "T")],
           outputs=[("Y", "T")], attributes=["bits", "group"], types={"T": ["tensor(float)"]},
           function=_matmul_grid_function)
def matmul_grid_reference(x, codes, types, scales, grid, bits: int, group: int) -> np.ndarray:
    k, nb, n = x.shape[-1], scales.shape[0], scales.shape[-1]
    c = unpack_codes(codes, bits, nb * group * n).reshape(nb, group, n)
    idx = np.asarray(types).astype(np.int64) * (1 << bits) + c
    w = (np.asarray(grid, np.float32)[idx] * np.asarray(scales, np.float32)).reshape(-1, n)[:k]
    return (x.astype(np.float32) @ w).astype(np.float32)
