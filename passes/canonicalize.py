"""Canonicalization: bring graphs from any exporter into the form the other passes recognise.

* ``Gemm(A, B, C)`` with a constant ``B`` (and ``transA = 0``) becomes ``MatMul(A, B') + C'`` with
  ``B' = alpha·op(B)`` and ``C' = beta·C``: ``alpha·A·op(B) + beta·C = A·(alpha·op(B)) + beta·C``.
* ``Identity(W)`` of an initializer (exporters' deduplication) is an initializer of its own.
* ``MatMul(x, Transpose(W))`` with a constant 2-D ``W`` (a head tied to the embedding table, as torch's
  exporter writes it) reads a transposed copy ``Wᵀ`` as its own initializer, so the head is a linear layer
  the other passes find and quantize (the table itself stays for its ``Gather``).
* Decomposed LayerNorm / RMSNorm subgraphs (ReduceMean, Sub, Pow, Sqrt, Div, …) become
  ``LayerNormalization`` / an RMS norm through onnxscript's own fusion rules, so smoothing and
  rotation can fold into their scales.  The RMS norm is ONNX ``RMSNormalization`` only where the
  model's opset has it (>= 23); below, it is ONNX Runtime's ``SimplifiedLayerNormalization`` (same
  formula ``x / sqrt(mean(x²) + ε) · γ``, registered by ORT in the ONNX domain at every opset).
  The model's opset is never raised behind its back: an opset-21 model stays opset 21.
* A float16 / bfloat16 / float64 model gets a float32 interior with its interface type kept
  (:mod:`lowbit.ir.precision`), so every node later passes insert is type-consistent.
* A main-graph value that an ``If``/``Loop``/``Scan`` body reads as well reaches the body through a copy of
  its own (``Identity`` or a copied initializer, :func:`lowbit.ir.subgraphs.fence_subgraph_reads`), so the
  passes, which rewrite the main graph only, never retype or rescale what the body reads.
Float outputs are unchanged up to rounding.  The ONNX frontend runs this pass on every file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

__all__ = ["Canonicalize"]


_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _gemm_base(node: ir.Node, b: ir.Value) -> str:
    """A layer name for a Gemm: its weight's name without ``.weight`` (``h.0.attn.c_attn``), else the node's."""
    name = (b.name or "").removeprefix("m.")
    for suffix in (".weight", ".W", "_weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return node.name or "gemm"


def _keep_initializer_order(graph: ir.Graph, order: list[str]) -> None:
    """Put the initializers back in ``order`` (names not in it after them): the same model serializes the same,
    so a canonicalization that changes nothing reports ``modified=False`` truthfully."""
    data = graph.initializers.data
    if list(data)[: len(order)] == order:
        return
    ordered = {name: data[name] for name in order if name in data}
    ordered.update((name, value) for name, value in data.items() if name not in ordered)
    data.clear()
    data.update(ordered)


@register_pass("canonicalize")
class Canonicalize(Pass):
    @dataclass(frozen=True)
    class Options:
        gemm: bool = True
        norms: bool = True
        float32: bool = True  # float32 interior for float16/bfloat16/float64 models

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
            dtype = b.const_value.numpy().dtype  # the model's float type (a float16 Gemm stays float16)
            w = b.const_value.numpy().astype(np.float64)
            w = ((w.T if _attr(node, "transB", 0) else w) * _attr(node, "alpha", 1.0)).astype(dtype)
            base = _gemm_base(node, b)
            wv = add_initializer(graph, f"{base}.weight", np.ascontiguousarray(w))
            mm = make_node(graph, "MatMul", [node.inputs[0], wv], origin=self.name, name=f"{base}.matmul", before=node)
            out = mm.outputs[0]
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None:
                if c.const_value is not None:
                    cv = c.const_value.numpy()
                    cv = add_initializer(graph, f"{base}.bias",
                                         (cv.astype(np.float64) * _attr(node, "beta", 1.0)).astype(cv.dtype))
                elif _attr(node, "beta", 1.0) == 1.0:
                    cv = c
                else:
                    self.fail("Gemm with a non-constant C and beta != 1", node=node)
                out = make_node(graph, "Add", [out, cv], origin=self.name, name=f"{base}.bias_add", before=node).outputs[0]
            replace_value(graph, node.outputs[0], out)
            graph.remove(node, safe=True)
            self.stats["gemm_to_matmul"] += 1

    def _fold_constant_identities(self, graph: ir.Graph) -> None:
        """``Identity(W)`` of an initializer (exporters deduplicate equal tensors: optimum's GPT-2 reads every unit
        LayerNorm γ through an Identity of one) becomes an initializer of the output's name holding the same
        tensor, so each norm and linear has a constant of its own."""
        for node in list(graph):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if src is None or src.const_value is None or src.producer() is not None or src in graph.inputs \
                    or out in graph.outputs:
                continue
            name = out.name
            out.name = f"{name}_identity"
            value = ir.Value(name=name, const_value=src.const_value, shape=src.shape, type=src.type)
            graph.register_initializer(value)
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            self.stats["identities_folded"] += 1

    def _fold_constant_transposes(self, graph: ir.Graph) -> None:
        """``Transpose(W)`` of a constant matrix read only as MatMul weights becomes the initializer ``Wᵀ``."""
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if src is None or src.const_value is None or src.producer() is not None or src in graph.inputs \
                    or len(src.const_value.shape) != 2 or list(_attr(node, "perm", [1, 0])) != [1, 0]:
                continue
            uses = list(out.uses())
            if not uses or out in graph.outputs or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
                continue
            wt = add_initializer(graph, f"{src.name}.T", np.ascontiguousarray(src.const_value.numpy().T))
            replace_value(graph, out, wt)
            graph.remove(node, safe=True)
            self.stats["transposes_folded"] += 1

    def _reciprocal_form(self, graph: ir.Graph) -> None:
        """``1 / sqrt(v)`` and ``x / sqrt(v)`` (TorchScript exports) as ``Reciprocal`` (+ ``Mul``): the form the
        RMSNorm rules match.  x / y = x · (1 / y)."""
        for node in list(graph):
            if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            num, den = node.inputs
            if den is None or den.producer() is None or den.producer().op_type != "Sqrt":
                continue
            one = num.const_value.numpy() if num is not None and num.const_value is not None else None
            rec = make_node(graph, "Reciprocal", [den], origin=self.name, name=f"{node.name or 'div'}.reciprocal",
                            before=node)
            if one is not None and one.size == 1 and float(one.ravel()[0]) == 1.0:
                replace_value(graph, node.outputs[0], rec.outputs[0])
            else:
                mul = make_node(graph, "Mul", [num, rec.outputs[0]], origin=self.name, name=f"{node.name or 'div'}.mul",
                                before=node)
                replace_value(graph, node.outputs[0], mul.outputs[0])
            graph.remove(node, safe=True)
            self.stats["div_sqrt_as_reciprocal"] += 1

    def _drop_identity_casts(self, graph: ir.Graph) -> None:
        """A Cast to the type its input already has is the identity (and hides a norm from its linears)."""
        for node in list(graph):
            to = node.attributes.get("to")
            src = node.inputs[0] if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.inputs else None
            if src is not None and to is not None and src.dtype is not None and int(src.dtype) == to.value \
                    and node.outputs[0] not in graph.outputs:
                node.outputs[0].replace_all_uses_with(src)
                graph.remove(node, safe=True)
                self.stats["identity_casts_removed"] += 1

    def _fuse_norms(self, model: ir.Model) -> None:
        from onnx_ir.passes.common import ShapeInferencePass
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_ruleset
        from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_ruleset

        before = sum(1 for n in model.graph if n.op_type in _NORMS)
        for node in model.graph:  # the rules read constants (axes) through const_value: give Constant outputs one
            value = node.attributes.get("value")
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None \
                    and node.outputs[0].const_value is None and value.type == ir.AttributeType.TENSOR:
                node.outputs[0].const_value = value.value
        self._reciprocal_form(model.graph)
        for node in model.graph:  # the fusion patterns match these attributes literally: spell out defaults
            if node.op_type == "ReduceMean":
                for name, default in (("keepdims", 1), ("noop_with_empty_axes", 0)):
                    if name not in node.attributes:
                        node.attributes[name] = ir.AttrInt64(name, default)
                        self.stats["defaults_spelled_out"] += 1
        order = list(model.graph.initializers)
        try:
            self._typed = ShapeInferencePass()(model).modified  # value types/shapes added: the IR changed
        except Exception as exc:  # dtype inference only helps the fusion rules' checks
            self.stats["shape_inference_failed"] += 1
            del exc
        finally:  # onnx_ir's shape inference re-registers large initializers last: keep the model's order
            _keep_initializer_order(model.graph, order)
        self._drop_identity_casts(model.graph)
        rules = [*layer_normalization_ruleset.rules, *rms_normalization_ruleset.rules]
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 23:  # RMSNormalization is opset 23: use ORT's equivalent op instead
            for node in model.graph:
                if node.op_type == "RMSNormalization" and node.domain in ("", "ai.onnx"):
                    node.op_type = "SimplifiedLayerNormalization"
                    node.domain = ""
                    self.stats["rms_as_simplified_layer_norm"] += 1
        after = sum(1 for n in model.graph if n.op_type in _NORMS)
        self.stats["norms_fused"] += after - before

    def call(self, model):
        graph = model.graph
        self._fold_constant_identities(graph)
        self._fold_constant_transposes(graph)
        if self.options.gemm:
            self._gemm_to_matmul(graph)
        if self.options.norms:
            self._fuse_norms(model)
        if self.options.float32:  # after fusion: the rules would fuse through the interface Cast
            from lowbit.ir.precision import to_float32_interior

            self.stats["float32_interior"] = int(to_float32_interior(model))
            if self.stats["float32_interior"]:  # the exporter's float16 ↔ float32 casts around norms are now identities
                self._drop_identity_casts(graph)
        from lowbit.ir.subgraphs import fence_subgraph_reads

        self.stats["subgraph_reads_fenced"] = fence_subgraph_reads(graph)
        graph.meta.pop("lowbit.names", None)
        edits = ("subgraph_reads_fenced", "identities_folded", "transposes_folded", "gemm_to_matmul", "norms_fused", "float32_interior", "defaults_spelled_out",
                 "identity_casts_removed", "rms_as_simplified_layer_norm", "div_sqrt_as_reciprocal")
        return PassResult(model, modified=any(self.stats[k] for k in edits) or getattr(self, "_typed", False))
