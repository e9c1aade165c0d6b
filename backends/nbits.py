"""Lowering of weight-only low-bit linears and lowbit ops to ONNX Runtime's fast kernels.

``lower-nbits`` rewrites ``DequantizeLinear(INT/UINT b ∈ {2, 4, 8}, blocked along K) → MatMul``
into ``com.microsoft.MatMulNBits`` with ORT's layout (checked against ORT's own
``MatMulNBitsQuantizer`` in the tests):

* ``B`` uint8 ``[N, K/block, block·b/8]``: column n's codes along K, consecutive codes packed
  low bits first (4-bit: even k in the low nibble); K is padded to whole blocks.
* ``scales`` float ``[N, K/block]``; ``zero_points`` uint8 ``[N, ⌈(K/block)·b/8⌉]`` packed the
  same way (absent: 2^(b−1)); ``W[k, n] = (code − zp)·scale``.  Symmetric INT{b} values v become
  codes v + 2^(b−1) with the default zero point.

``accuracy_level`` (the MatMulNBits attribute): 0 keeps activations in float (exact); 4 quantizes
activations to int8 per block inside the kernel (W×A8 integer dot products: ≈0.5 % error).  ORT has a
fast level-0 kernel only for 4 bits; 2- and 8-bit layers at level 0 run a reference kernel hundreds of
times slower.  ``accuracy_level=auto`` (default) writes, per layer's bit width, level 0 where ORT's
latency table (:mod:`lowbit.backends.ort_levels`) does not mark it slow and the fastest level
otherwise; ``fastest`` always the fastest; an integer forces that level, and a layer that would then
run a slow kernel is reported by name (``slow=warn``, default), refused (``slow=error``) or let be
(``slow=allow``).  Blocks must be
16..256 and a power of two; a per-channel layer is one block when K rounds up to ≤ 256, otherwise
it stays in QDQ form.  ``lowbit.Hadamard`` becomes its Kronecker form with standard ops
(``reshape → ·Q → H_p/√p· → reshape``; ``hadamard=function`` keeps the op and its function body).
``lowbit.MatMul3Bit`` and ``lowbit.MatMulGrid`` stay as they are (3 bits per weight / the grid form on disk),
but ORT runs their function bodies, which unpack the whole weight on every call: each such layer is reported
by name like a slow level (``slow=warn``; ``error`` refuses); their fast load-time paths are ``expand-3bit``
and ``expand-grid`` (:mod:`lowbit.backends.expand3`, :mod:`lowbit.backends.expand_grid`, both run by
:func:`lowbit.runtime.fastpath.fast_session`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import logging

import numpy as np
import onnx_ir as ir

from lowbit.ops.registry import DOMAIN, attach_functions
from lowbit.ops.float_ops import hadamard_matrix
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, LOWERED_ORT, QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value
from lowbit.errors import LowbitError

from .ort_levels import SLOW_FACTOR, choose_level, is_slow

__all__ = ["LowerNBits", "pack_nbits", "nbits_node_inputs", "BLOCK_SIZES"]

logger = logging.getLogger(__name__)

BLOCK_SIZES = (16, 32, 64, 128, 256)
# lowbit ops with no ORT kernel: ORT runs their function body (the weight unpacked on every call); the
# load-time rewrite that makes them fast
_UNPACKED_EACH_CALL = {"MatMul3Bit": "expand-3bit", "MatMulGrid": "expand-grid"}
_KINDS = {ir.DataType.INT2: (2, True), ir.DataType.UINT2: (2, False), ir.DataType.INT4: (4, True),
          ir.DataType.UINT4: (4, False), ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False)}


def pack_nbits(codes: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """uint codes [..., L] → uint8 [..., ⌈L·bits/8⌉], consecutive codes low bits first, padded with ``fill``."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    c = np.concatenate([codes, np.full(codes.shape[:-1] + (pad,), fill, codes.dtype)], axis=-1) if pad else codes
    c = c.astype(np.uint8).reshape(codes.shape[:-1] + (-1, per))
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def nbits_node_inputs(codes_nk: np.ndarray, scales_ng: np.ndarray, zp_ng: np.ndarray | None, bits: int,
                      block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits (B, scales, zero_points) from codes [N, K], scales/zero points [N, G]."""
    n, k = codes_nk.shape
    g = -(-k // block)
    padded = np.zeros((n, g * block), np.uint8)
    padded[:, :k] = codes_nk
    b = pack_nbits(padded.reshape(n, g, block), bits)
    zp = None if zp_ng is None else pack_nbits(zp_ng.astype(np.uint8), bits, fill=1 << (bits - 1))  # as ORT pads
    return b, np.ascontiguousarray(scales_ng, np.float32), zp


@register_pass("lower-nbits")
class LowerNBits(Pass):
    @dataclass(frozen=True)
    class Options:
        accuracy_level: int | str = "auto"  # auto | fastest | 0 (float activations) .. 4 (int8 activations)
        hadamard: Literal["kron", "function"] = "kron"
        slow: Literal["warn", "error", "allow"] = "warn"  # a forced level that runs ORT's reference kernel

        def __post_init__(self):
            if self.accuracy_level not in (0, 1, 2, 3, 4, "auto", "fastest"):
                raise ValueError(f"lower-nbits: accuracy_level must be auto, fastest or 0..4, got {self.accuracy_level}")
            if self.hadamard not in ("kron", "function"):
                raise ValueError(f"lower-nbits: hadamard must be kron or function, got {self.hadamard}")

    requires_properties = (QUANTIZED,)
    ensures_properties = (LOWERED_ORT,)
    invalidates_properties = (CALIBRATED, HESSIAN)  # the Kronecker Hadamard adds MatMuls without statistics

    def call(self, model):
        graph = model.graph
        self._slow: list[str] = []
        self._bodies: dict[str, int] = {}
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                self._matmul(graph, node)
            elif node.op_type in _UNPACKED_EACH_CALL and node.domain == DOMAIN:
                self._unpacked(node)
            elif node.op_type == "Hadamard" and node.domain == DOMAIN and self.options.hadamard == "kron":
                self._hadamard(graph, node)
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        if any(n.domain == "com.microsoft" for n in graph):
            model.opset_imports["com.microsoft"] = 1
        for key in [k for k in model.functions if k[0] == DOMAIN]:
            del model.functions[key]
        attach_functions(model)
        self.ctx.report["lower-nbits"] = {"accuracy_level": self.options.accuracy_level, **dict(self.stats),
                                          **{f"function_body_{k}": v for k, v in self._bodies.items()}}
        if self._slow:
            logger.warning("lower-nbits: %d layer(s) run a slow ORT path (reference kernel or function body): %s",
                           len(self._slow),
                           ", ".join(self._slow[:8]) + (" ..." if len(self._slow) > 8 else ""))
        return PassResult(model, modified=bool(sum(self.stats.values())))

    def _unpacked(self, node: ir.Node) -> None:
        """lowbit ops ORT runs as their function body, which unpacks the whole weight on every call."""
        self._bodies[node.op_type] = self._bodies.get(node.op_type, 0) + 1
        if self.options.slow == "allow":
            return
        fix = _UNPACKED_EACH_CALL[node.op_type]
        if self.options.slow == "error":
            raise LowbitError(f"lower-nbits: node '{node.name}': {node.op_type} runs its ONNX function body in ORT "
                              "(the weight is unpacked on every call, hundreds of times a float MatMul)",
                              hint=f"run the model through lowbit.runtime.fastpath.fast_session ({fix}) or "
                                   "--backend tvm, or pass slow=allow")
        self._slow.append(f"{node.name} ({node.op_type}: function body; fast_session runs {fix})")

    def _matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(node.inputs[1].uses()) != 1:
            return
        data = dq.inputs[0].const_value
        if data is None or data.dtype not in _KINDS or len(data.shape) != 2:
            return
        bits, signed = _KINDS[data.dtype]
        k, n = data.shape
        axis = dq.attributes.get_int("axis", 1)
        block = dq.attributes.get_int("block_size", 0)
        scales = dq.inputs[1].const_value.numpy().astype(np.float32)
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        if axis == 1 and not block:  # per channel: one block along K
            block = max(16, 1 << (k - 1).bit_length())
            scales, zp_arr = scales.reshape(1, n), None if zp_v is None else zp_v.const_value.numpy().reshape(1, n)
        elif axis == 0 and block:
            zp_arr = None if zp_v is None else zp_v.const_value.numpy()
        else:
            self.stats["skipped_layout"] += 1
            return
        if block not in BLOCK_SIZES:
            self.stats["skipped_block_size"] += 1
            return
        vals = data.numpy().astype(np.int16)
        if signed:
            if zp_arr is not None and np.any(zp_arr.astype(np.int16) != 0):
                self.stats["skipped_signed_zero_point"] += 1
                return
            codes, zp_arr = vals + (1 << (bits - 1)), None
        else:
            codes = vals
            if zp_arr is None:
                zp_arr = np.zeros(scales.shape, np.uint8)
        b, s, z = nbits_node_inputs(np.ascontiguousarray(codes.T), scales.T, None if zp_arr is None else
                                    zp_arr.astype(np.int16).T, bits, block)
        name = node.name or "matmul"
        inputs = [node.inputs[0], add_initializer(graph, f"{name}.B{bits}", b),
                  add_initializer(graph, f"{name}.scales", s)]
        if z is not None:
            inputs.append(add_initializer(graph, f"{name}.zero_points", z))
        level = choose_level(bits, self.options.accuracy_level)
        if is_slow(bits, level) and self.options.slow != "allow":
            what = (f"node '{node.name}': {bits}-bit MatMulNBits at accuracy_level={level} runs ORT's reference "
                    f"kernel (>{SLOW_FACTOR:g}x slower than the fastest level)")
            if self.options.slow == "error":
                raise LowbitError(f"lower-nbits: {what}", hint="use accuracy_level=auto (or fastest), or slow=allow")
            self._slow.append(f"{node.name} ({bits}-bit, level {level})")
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": level}
        new = make_node(graph, "MatMulNBits", inputs, origin=self.name, name=f"{name}.nbits", attributes=attrs,
                        domain="com.microsoft", before=node)
        new.metadata_props.update({k_: v for k_, v in node.metadata_props.items() if k_.startswith("lowbit.")})
        self._replace(graph, node, new)
        self.stats[f"matmulnbits_{bits}bit"] += 1
        self.stats[f"matmulnbits_{bits}bit_level{level}"] += 1

    def _replace(self, graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
        out, res = old.outputs[0], new.outputs[0]
        if out.dtype is not None:
            res.dtype, res.shape = out.dtype, out.shape
        replace_value(graph, out, res)
        graph.remove(old, safe=True)

    def _hadamard(self, graph: ir.Graph, node: ir.Node) -> None:
        q = node.inputs[1].const_value
        if q is None:
            return
        m = q.shape[0]
        x = node.inputs[0]
        name = node.name or "hadamard"
        n = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
        n = n or int(node.metadata_props.get("lowbit.width", 0))
        if not n:
            self.stats["skipped_hadamard_unknown_width"] += 1
            return
        p = n // m
        c = lambda suffix, arr: add_initializer(graph, f"{name}.{suffix}", arr)  # noqa: E731
        shape = make_node(graph, "Shape", [x], origin=self.name, name=f"{name}.shape", before=node).outputs[0]
        x3 = make_node(graph, "Reshape", [x, c("shape3", np.array([-1, p, m], np.int64))], origin=self.name,
                       name=f"{name}.split", before=node).outputs[0]
        if m > 1:
            x3 = make_node(graph, "MatMul", [x3, node.inputs[1]], origin=self.name, name=f"{name}.q",
                           before=node).outputs[0]
        hp = c(f"h{p}", hadamard_matrix(p).astype(np.float32))
        y3 = make_node(graph, "MatMul", [hp, x3], origin=self.name, name=f"{name}.hp", before=node).outputs[0]
        y = make_node(graph, "Reshape", [y3, shape], origin=self.name, name=f"{name}.merge", before=node)
        self._replace(graph, node, y)
        self.stats["hadamard_kron"] += 1
