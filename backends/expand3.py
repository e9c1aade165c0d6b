"""``expand-3bit``: rewrite each ``lowbit.MatMul3Bit`` into ORT's 4-bit ``MatMulNBits`` (a load-time fast path).

On disk a 3-bit layer holds 3 bits per weight (8 codes in 3 bytes).  ONNX Runtime has no 3-bit
kernel, and the op's function body dequantizes the whole weight to float on every call.  The same
codes (0..7 fit in 4 bits), scales and zero points as ``MatMulNBits(bits=4)`` compute the same
``W[k, n] = (c − z)·s`` exactly, so results equal the 3-bit reference up to float summation order
while ORT's 4-bit kernels run it.  The price is 4 bits per weight in memory; the file stays 3-bit.
Run by :func:`lowbit.runtime.fastpath.fast_session` on an in-memory copy, never on a written file.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from lowbit.backends.nbits import BLOCK_SIZES, nbits_node_inputs
from lowbit.ir.rewrite import replace_value
from lowbit.ops.float_ops import unpack3
from lowbit.ops.registry import DOMAIN
from lowbit.passmanager.manager import Pass, PassResult, register_pass

__all__ = ["Expand3Bit", "expand_3bit"]


def expand_3bit(model: ir.Model, accuracy_level: int = 0) -> int:
    """Rewrite every ``lowbit.MatMul3Bit`` of ``model`` in place into 4-bit MatMulNBits; returns the count."""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMul3Bit" or node.domain != DOMAIN:
            continue
        x, packed, scales, zps = node.inputs
        block = node.attributes.get_int("block_size")
        s, z = scales.const_value.numpy(), zps.const_value.numpy()
        k = int(node.metadata_props.get("lowbit.k", 0)) or int(block * s.shape[1])
        k = min(k, packed.const_value.shape[1] // 3 * 8)
        if block not in BLOCK_SIZES:
            continue
        codes = unpack3(packed.const_value.numpy(), k)
        b, s4, z4 = nbits_node_inputs(codes, s, z, 4, block)
        n = codes.shape[0]
        vals = []
        for suffix, arr in (("B4", b), ("scales4", s4), ("zp4", z4)):
            v = ir.Value(name=f"{node.name}.{suffix}", const_value=ir.tensor(arr, name=f"{node.name}.{suffix}"))
            graph.register_initializer(v)
            vals.append(v)
        new = ir.Node("com.microsoft", "MatMulNBits", [x, *vals], name=f"{node.name}.nbits4",
                      attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                                  ir.AttrInt64("block_size", block), ir.AttrInt64("accuracy_level", accuracy_level)],
                      outputs=[ir.Value(name=f"{node.name}.nbits4_out")])
        graph.insert_before(node, new)
        replace_value(graph, node.outputs[0], new.outputs[0])
        graph.remove(node, safe=True)
        count += 1
    if count:
        model.opset_imports["com.microsoft"] = 1
        for v in list(graph.initializers.values()):
            if not list(v.uses()) and v not in graph.outputs:
                del graph.initializers[v.name]
    return count


@register_pass("expand-3bit")
class Expand3Bit(Pass):
    """Run 3-bit layers on 4-bit MatMulNBits kernels (see the module doc)."""

    @dataclass(frozen=True)
    class Options:
        accuracy_level: int = 0

        def __post_init__(self):
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ValueError(f"expand-3bit: accuracy_level must be 0..4, got {self.accuracy_level}")

    def call(self, model):
        count = expand_3bit(model, self.options.accuracy_level)
        self.stats["layers"] = count
        return PassResult(model, modified=count > 0)
