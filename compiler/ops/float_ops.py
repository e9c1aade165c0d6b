"""lowbit ops on float activations, run in plain ONNX through function bodies (domain ``lowbit``, version 1).

* ``MatMul3Bit(X[..., K], B uint8 [N, ⌈K/8⌉·3], scales float [N, G], zero_points uint8 [N, G];
  block_size) → Y[..., N]``.  3-bit codes of Wᵀ packed 8 per 3 bytes, little-endian:
  ``word = b0 + 256·b1 + 65536·b2`` holds codes ``c_j = (word >> 3j) & 7`` for k = 8p + j (codes past K
  are zero).  ``W[k, n] = (c[n, k] − z[n, k // block_size])·s[n, k // block_size]``, ``Y = X·W``.
  The function body unpacks with integer Mul/ReduceSum/Div/Mod, dequantizes and runs MatMul, so
  any ONNX runtime runs it.
* ``Hadamard(X[..., n], Q float [m, m]) → Y = X·(H_p/√p ⊗ Q)`` with p = n/m a power of two and
  H_p Sylvester's Hadamard matrix (``H[i, j] = (−1)^popcount(i & j)``); orthogonal when Q is.
  Q = [[1]] gives the plain normalised Hadamard transform; Q of size 43 handles n = 172 = 4·43.
  The function body builds H_p from index parity (BitwiseAnd/BitShift/BitwiseXor on uint32) and
  applies it as ``H_p/√p · reshape(X, [-1, p, m]) · Q``: cost n·(p + m) per row, not n².

Both register with :func:`lowbit.ops.registry.lowbit_op`; :func:`lowbit.ops.registry.attach_functions`
adds their bodies to a model that uses them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from lowbit.ops.registry import DOMAIN, lowbit_op

__all__ = ["pack3", "unpack3", "matmul3bit_reference", "hadamard_matrix", "hadamard_reference"]

_FLOAT = {"T": ["tensor(float)"]}


# ---------------------------------------------------------------- MatMul3Bit
def pack3(codes: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] in [0, 8) → uint8 [N, ⌈K/8⌉·3]."""
    n, k = codes.shape
    kp = -(-k // 8) * 8
    c = np.zeros((n, kp), np.uint32)
    c[:, :k] = codes
    if codes.size and codes.max() > 7:
        raise ValueError("3-bit codes must be in [0, 8)")
    word = (c.reshape(n, -1, 8) << (3 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    out = np.stack([(word >> (8 * i)) & 0xFF for i in range(3)], axis=-1).astype(np.uint8)
    return out.reshape(n, -1)


def unpack3(packed: np.ndarray, k: int) -> np.ndarray:
    n = packed.shape[0]
    b = packed.reshape(n, -1, 3).astype(np.uint32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = (word[..., None] >> (3 * np.arange(8, dtype=np.uint32))) & 7
    return codes.reshape(n, -1)[:, :k].astype(np.uint8)


def _matmul3bit_function(opset: int = 21) -> onnx.FunctionProto:
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr))  # noqa: E731
    bs = helper.make_node("Constant", [], ["bs0"])
    bs.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name="block_size"))
    nodes = [
        c("c_bytes", np.array([1, 256, 65536], np.int32)), c("c_shifts", 8 ** np.arange(8, dtype=np.int32)),
        c("c_eight", np.array(8, np.int32)), c("c_shape3", np.array([0, -1, 3], np.int64)),
        c("c_flat", np.array([0, -1], np.int64)), c("c_axm1", np.array([-1], np.int64)),
        c("c_ax2", np.array([2], np.int64)), c("c_zero", np.array([0], np.int64)),
        c("c_one", np.array([1], np.int64)), c("c_ones2", np.array([1, 1], np.int64)),
        helper.make_node("Shape", ["X"], ["K"], start=-1),
        helper.make_node("Cast", ["B"], ["Bi"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["Bi", "c_shape3"], ["B3"]),
        helper.make_node("Mul", ["B3", "c_bytes"], ["B3w"]),
        helper.make_node("ReduceSum", ["B3w", "c_axm1"], ["word"], keepdims=1),
        helper.make_node("Div", ["word", "c_shifts"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "c_eight"], ["codes8"]),
        helper.make_node("Reshape", ["codes8", "c_flat"], ["codes_p"]),
        helper.make_node("Slice", ["codes_p", "c_zero", "K", "c_one"], ["codes"]),
        helper.make_node("Cast", ["codes"], ["codes_f"], to=TensorProto.FLOAT),
        bs, helper.make_node("Reshape", ["bs0", "c_one"], ["bs1"]),
        helper.make_node("Concat", ["c_ones2", "bs1"], ["expand_shape"], axis=0),
        helper.make_node("Cast", ["zero_points"], ["zp_f"], to=TensorProto.FLOAT),
    ]
    for src, dst in (("scales", "s_full"), ("zp_f", "z_full")):
        nodes += [helper.make_node("Unsqueeze", [src, "c_ax2"], [f"{src}_3"]),
                  helper.make_node("Expand", [f"{src}_3", "expand_shape"], [f"{src}_e"]),
                  helper.make_node("Reshape", [f"{src}_e", "c_flat"], [f"{src}_f"]),
                  helper.make_node("Slice", [f"{src}_f", "c_zero", "K", "c_one"], [dst])]
    nodes += [helper.make_node("Sub", ["codes_f", "z_full"], ["centered"]),
              helper.make_node("Mul", ["centered", "s_full"], ["Wt"]),
              helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
              helper.make_node("MatMul", ["X", "W"], ["Y"])]
    return helper.make_function(DOMAIN, "MatMul3Bit", ["X", "B", "scales", "zero_points"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)], attributes=["block_size"])


@lowbit_op("MatMul3Bit", doc="Y = X·W, W[k, n] = (c[n, k] − z[n, g])·s[n, g], g = k // block_size; c: 3-bit "
           "codes of Wᵀ packed 8 per 3 bytes (little-endian 24-bit words).",
           inputs=[("X", "T"), ("B", "tensor(uint8)"), ("scales", "T"), ("zero_points", "tensor(uint8)")],
           outputs=[("Y", "T")], attributes=["block_size"], types=_FLOAT, function=_matmul3bit_function)
def matmul3bit_reference(x, packed, scales, zero_points, block_size: int) -> np.ndarray:
    k = x.shape[-1]
    codes = unpack3(packed, k).astype(np.float32)
    g = np.arange(k) // block_size
    w = (codes - zero_points[:, g].astype(np.float32)) * scales[:, g]  # [N, K]
    return (x.astype(np.float32) @ w.T).astype(np.float32)


# ---------------------------------------------------------------- Hadamard
def hadamard_matrix(p: int) -> np.ndarray:
    """Sylvester's H_p / √p (p a power of two)."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {p}")
    i = np.arange(p)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.array([bin(int(v)).count("1") & 1 for v in bits.ravel()]).reshape(p, p)
    return ((1 - 2 * parity) / np.sqrt(p)).astype(np.float64)


def _hadamard_function(opset: int = 21) -> onnx.FunctionProto:
    c = lambda name, arr: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr))  # noqa: E731
    nodes = [c("c_zero", np.array(0, np.int64)), c("c_one", np.array(1, np.int64)),
             c("c_ax0", np.array([0], np.int64)), c("c_ax1", np.array([1], np.int64)),
             c("c_m1", np.array([-1], np.int64)), c("u1", np.array(1, np.uint32)),
             helper.make_node("Shape", ["X"], ["xshape"]),
             helper.make_node("Shape", ["X"], ["n1"], start=-1),
             helper.make_node("Shape", ["Q"], ["m1"], start=0, end=1),
             helper.make_node("Div", ["n1", "m1"], ["p1"]),
             helper.make_node("Squeeze", ["p1"], ["p"]),
             helper.make_node("Range", ["c_zero", "p", "c_one"], ["idx"]),
             helper.make_node("Cast", ["idx"], ["idx_u"], to=TensorProto.UINT32),
             helper.make_node("Unsqueeze", ["idx_u", "c_ax1"], ["rows"]),
             helper.make_node("Unsqueeze", ["idx_u", "c_ax0"], ["cols"]),
             helper.make_node("BitwiseAnd", ["rows", "cols"], ["a0"])]
    last = "a0"
    for i, sh in enumerate((16, 8, 4, 2, 1)):
        nodes += [c(f"sh{i}", np.array(sh, np.uint32)),
                  helper.make_node("BitShift", [last, f"sh{i}"], [f"s{i}"], direction="RIGHT"),
                  helper.make_node("BitwiseXor", [last, f"s{i}"], [f"a{i + 1}"])]
        last = f"a{i + 1}"
    nodes += [helper.make_node("BitwiseAnd", [last, "u1"], ["par"]),
              helper.make_node("Cast", ["par"], ["par_f"], to=TensorProto.FLOAT),
              c("f_two", np.array(-2.0, np.float32)), c("f_one", np.array(1.0, np.float32)),
              helper.make_node("Mul", ["par_f", "f_two"], ["par2"]),
              helper.make_node("Add", ["par2", "f_one"], ["sign"]),
              helper.make_node("Cast", ["p"], ["p_f"], to=TensorProto.FLOAT),
              helper.make_node("Sqrt", ["p_f"], ["sqrt_p"]),
              helper.make_node("Div", ["sign", "sqrt_p"], ["Hs"]),
              helper.make_node("Concat", ["c_m1", "p1", "m1"], ["shape3"], axis=0),
              helper.make_node("Reshape", ["X", "shape3"], ["X3"]),
              helper.make_node("MatMul", ["X3", "Q"], ["XQ"]),
              helper.make_node("MatMul", ["Hs", "XQ"], ["HXQ"]),
              helper.make_node("Reshape", ["HXQ", "xshape"], ["Y"])]
    return helper.make_function(DOMAIN, "Hadamard", ["X", "Q"], ["Y"], nodes, [helper.make_opsetid("", opset)])


@lowbit_op("Hadamard", doc="Y = X·(H_p/√p ⊗ Q), p = n/m a power of two, H_p Sylvester's Hadamard matrix.",
           inputs=[("X", "T"), ("Q", "T")], outputs=[("Y", "T")], types=_FLOAT, function=_hadamard_function)
def hadamard_reference(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    n, m = x.shape[-1], q.shape[0]
    return (x.astype(np.float64) @ np.kron(hadamard_matrix(n // m), q.astype(np.float64))).astype(np.float32)
