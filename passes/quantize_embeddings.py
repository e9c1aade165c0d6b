"""Embedding tables as int8 rows.  ``E[i] ≈ s[i] · Eq[i]`` with ``s[i] = max|E[i]| / 127``.

``Gather(E, ids)`` becomes ``Cast(Gather(Eq, ids)) · Unsqueeze(Gather(s, ids), -1)``: the lookup reads
int8 rows and one scale per row, so the table takes a quarter of its float bytes (MiniLM's word
embeddings: 47 MB → 12 MB).  Only a Gather on axis 0 of a constant float 2-D table is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.errors import InvalidWeightsError
from lowbit.passmanager.manager import Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

__all__ = ["QuantizeEmbeddings", "quantize_rows_int8"]


def quantize_rows_int8(table: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    if not np.all(np.isfinite(table)):
        raise InvalidWeightsError(f"embedding '{name}' holds NaN/Inf", hint="fix or re-export the model")
    amax = np.abs(table).max(axis=1).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8), scale


@register_pass("quantize-embeddings")
class QuantizeEmbeddings(Pass):
    @dataclass(frozen=True)
    class Options:
        min_rows: int = 256  # leave small tables (position/type embeddings) in float

        def __post_init__(self):
            if self.min_rows < 1:
                raise ValueError(f"quantize-embeddings: min_rows must be >= 1, got {self.min_rows}")

    def call(self, model):
        graph = model.graph
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            table = node.inputs[0]
            axis = node.attributes.get("axis")
            if (table.const_value is None or table.const_value.dtype != ir.DataType.FLOAT
                    or len(table.const_value.shape) != 2 or (axis is not None and axis.value != 0)
                    or table in graph.inputs):
                continue
            if table.const_value.shape[0] < self.options.min_rows:
                self.stats["small_tables"] += 1
                continue
            eq, s = quantize_rows_int8(table.const_value.numpy(), table.name)
            base, ids = table.name or node.name, node.inputs[1]

            def op(op_type, inputs, suffix, **attrs):
                return make_node(graph, op_type, inputs, origin=self.name, name=f"{base}.{suffix}",
                                 attributes=attrs, before=node).outputs[0]

            rows = op("Gather", [add_initializer(graph, f"{base}.rows_q", eq), ids], "gather_q", axis=0)
            scales = op("Gather", [add_initializer(graph, f"{base}.row_scale", s), ids], "gather_scale", axis=0)
            scales = op("Unsqueeze", [scales, add_initializer(graph, f"{base}.last_axis", np.array([-1], np.int64))],
                        "scale_col")
            y = op("Mul", [op("Cast", [rows], "rows_f32", to=ir.DataType.FLOAT), scales], "dequant")
            replace_value(graph, node.outputs[0], y)
            graph.remove(node, safe=True)
            self.stats["tables"] += 1
        graph.meta.pop("lowbit.names", None)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        return PassResult(model, modified=self.stats["tables"] > 0)
