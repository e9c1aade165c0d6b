"""Canonicalization: bring graphs from any exporter into the form the other passes recognise.

* ``Gemm(A, B, C)`` with a constant ``B`` (and ``transA = 0``) becomes ``MatMul(A, B') + C'`` with
  ``B' = alpha·op(B)`` and ``C' = beta·C``: ``alpha·A·op(B) + beta·C = A·(alpha·op(B)) + beta·C``.
* Decomposed LayerNorm / RMSNorm subgraphs (ReduceMean, Sub, Pow, Sqrt, Div, …) become
  ``LayerNormalization`` / ``SimplifiedLayerNormalization`` through onnxscript's own fusion rules,
  so smoothing and rotation can fold into their scales.
Float outputs are unchanged up to rounding.  The ONNX frontend runs this pass on every file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

__all__ = ["Canonicalize"]


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


@register_pass("canonicalize")
class Canonicalize(Pass):
    @dataclass(frozen=True)
    class Options:
        gemm: bool = True
        norms: bool = True

    float_equivalent = True
    invalidates_properties = (CALIBRATED, HESSIAN)  # fused norms / new MatMuls read new values

    def _gemm_to_matmul(self, graph: ir.Graph) -> None:
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            b = node.inputs[1]
            if b is None or b.const_value is None or _attr(node, "transA", 0):
                self.stats["gemm_kept"] += 1
                continue
            w = b.const_value.numpy().astype(np.float32)
            w = (w.T if _attr(node, "transB", 0) else w) * np.float32(_attr(node, "alpha", 1.0))
            base = node.name or "gemm"
            wv = add_initializer(graph, f"{base}.weight", np.ascontiguousarray(w))
            mm = make_node(graph, "MatMul", [node.inputs[0], wv], origin=self.name, name=f"{base}.matmul", before=node)
            out = mm.outputs[0]
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None:
                if c.const_value is not None:
                    cv = add_initializer(graph, f"{base}.bias",
                                         c.const_value.numpy() * np.float32(_attr(node, "beta", 1.0)))
                elif _attr(node, "beta", 1.0) == 1.0:
                    cv = c
                else:
                    self.fail("Gemm with a non-constant C and beta != 1", node=node)
                out = make_node(graph, "Add", [out, cv], origin=self.name, name=f"{base}.bias_add", before=node).outputs[0]
            replace_value(graph, node.outputs[0], out)
            graph.remove(node, safe=True)
            self.stats["gemm_to_matmul"] += 1

    def _fuse_norms(self, model: ir.Model) -> None:
        from onnx_ir.passes.common import ShapeInferencePass
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_ruleset
        from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_ruleset

        before = sum(1 for n in model.graph if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"))
        try:
            self._typed = ShapeInferencePass()(model).modified  # value types/shapes added: the IR changed
        except Exception as exc:  # dtype inference only helps the fusion rules' checks
            self.stats["shape_inference_failed"] += 1
            del exc
        rules = [*layer_normalization_ruleset.rules, *rms_normalization_ruleset.rules]
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
        after = sum(1 for n in model.graph if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization"))
        self.stats["norms_fused"] += after - before

    def call(self, model):
        graph = model.graph
        if self.options.gemm:
            self._gemm_to_matmul(graph)
        if self.options.norms:
            self._fuse_norms(model)
        graph.meta.pop("lowbit.names", None)
        return PassResult(model, modified=bool(self.stats["gemm_to_matmul"] or self.stats["norms_fused"]
                                                or getattr(self, "_typed", False)))
