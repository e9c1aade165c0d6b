"""Pass ``lower-lowbit``: replace every ``lowbit`` op by its registered in-graph lowering to standard ops.

Each op's lowering (``LowbitOp.lower`` in :mod:`lowbit.ops.registry`) emits standard ONNX ops that
compute exactly the op's numpy reference (bit for bit for the integer ops), so plain ONNX Runtime
runs the graph; the ``lowbit`` opset import is dropped once no lowbit node is left.  Ops that run
through a function body instead (``attach_functions``) and have no lowering are refused.  ``keep``
names ops a backend runs natively (``lowbit compile --backend tvm`` keeps the integer ops for
``lower-tvm``'s kernels); they stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.ops.registry import DOMAIN, OPS
from lowbit.passmanager.manager import Pass, PassResult, register_pass

__all__ = ["LowerLowbit"]


@register_pass("lower-lowbit")
class LowerLowbit(Pass):
    """Replace every ``lowbit`` op by its standard-ONNX lowering, so plain ONNX Runtime runs the graph."""

    @dataclass(frozen=True)
    class Options:
        keep: str = ""  # "+"-separated lowbit op names left in the graph, e.g. "Requantize+Lookup"

        def __post_init__(self):
            unknown = sorted(set(self.keep.split("+")) - set(OPS) - {""})
            if unknown:
                raise ValueError(f"lower-lowbit: keep names unknown lowbit ops {unknown}; known: {sorted(OPS)}")

    def call(self, model):
        graph = model.graph
        keep = set(self.options.keep.split("+")) - {""}
        for node in list(graph):
            if node.domain != DOMAIN or node.op_type in keep:
                continue
            op = OPS.get(node.op_type)
            if op is None or op.lower is None:
                self.fail(f"no lowering for lowbit.{node.op_type}", node=node,
                          hint="ops with a function body run through attach_functions (or lower-nbits)"
                          if op is not None else None)
            out = op.lower(graph, node, self.name)
            old = node.outputs[0]
            if old in graph.outputs:  # first: onnx_ir refuses to replace the uses of a graph output
                graph.outputs[graph.outputs.index(old)] = out
                out.dtype, out.shape = out.dtype or old.dtype, out.shape or old.shape  # a graph output keeps its type
            old.replace_all_uses_with(out)
            old.name, out.name = f"{old.name}_lowered", old.name
            graph.remove(node, safe=True)
            self.stats[f"lowbit.{node.op_type}"] += 1
        if DOMAIN in model.opset_imports and not any(n.domain == DOMAIN for n in graph):
            del model.opset_imports[DOMAIN]
        return PassResult(model, modified=sum(self.stats.values()) > 0)
