"""Lowering to ONNX Runtime, and proof that ORT runs the int8 GEMMs on integer kernels.

``lower-ort`` checks that every quantized linear is in a form ORT's CPU kernels take on the
u8×s8 integer path (uint8 activations, int8 weights: s8×s8 is 5–20× slower than fp32 on
x86), then asks ORT for its optimized graph and counts integer GEMM nodes
(``MatMulIntegerToFloat``, ``MatMulInteger``, ``QLinearMatMul``, ``DynamicQuantizeMatMul``)
against the number of quantized linears.  A static QDQ linear that ORT would fuse into a float
``Gemm`` (2-D or fixed-shape MatMul + bias) is first written as an explicit ``MatMulInteger`` →
rescale (:mod:`.ort_explicit`, same arithmetic) and counted again.  The counts go into the report;
a quantized linear that ORT still runs in float is an error, because the user asked for integer execution.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from lowbit.passmanager.manager import LOWERED_ORT, QUANTIZED, Pass, PassResult, register_pass

__all__ = ["LowerOrt", "ort_integer_kernels", "INTEGER_GEMMS"]

INTEGER_GEMMS = {"MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul"}


def ort_integer_kernels(model: ir.Model | str | Path, integer_inputs: set | None = None) -> collections.Counter:
    """Op-type counts of the graph ORT actually runs after its own optimizations.

    With ``integer_inputs`` (a set), the names of every tensor read by an integer GEMM are added to it.
    """
    nodes = ort_optimized_nodes(model, integer_inputs)
    return collections.Counter(op for op, _ in nodes)


def ort_optimized_nodes(model: ir.Model | str | Path, integer_inputs: set | None = None) -> list[tuple[str, str]]:
    """(op type, node name) of the graph ORT actually runs after its own optimizations."""
    from lowbit.ir.sessions import make_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        make_session(model, optimized_model_path=str(path))
        proto = onnx.load(str(path), load_external_data=False)
    if integer_inputs is not None:
        integer_inputs.update(i for n in proto.graph.node if n.op_type in INTEGER_GEMMS for i in n.input)
    return [(n.op_type, n.name) for n in proto.graph.node]


def _not_on_integer_kernels(names: list[str], nodes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(linear, the op ORT runs it as) for each quantized linear whose fused node is not an integer GEMM
    (ORT names a fused node after the node it grew from: ``l0``, ``l0/MatMulAddFusion``)."""
    out = []
    for name in names:
        mine = [(op, n) for op, n in nodes if (n == name or n.startswith(name + "/") or f" {name}/" in f" {n}")
                and op not in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")]
        if mine and not any(op in INTEGER_GEMMS for op, _ in mine):
            out.append((name, mine[0][0]))
    return out


def _weight_name(node: ir.Node) -> str | None:
    w = node.inputs[1]
    prod = w.producer() if w is not None else None
    return prod.inputs[0].name if prod is not None and prod.op_type == "DequantizeLinear" else (w.name if w else None)


def _weight_dtype(node: ir.Node) -> ir.DataType | None:
    w = node.inputs[1]
    if w is None:
        return None
    prod = w.producer()
    if prod is not None and prod.op_type == "DequantizeLinear":
        src = prod.inputs[0]
        return src.const_value.dtype if src.const_value is not None else None
    return w.const_value.dtype if w.const_value is not None else None


@register_pass("lower-ort")
class LowerOrt(Pass):
    @dataclass(frozen=True)
    class Options:
        verify: bool = True  # ask ORT for its optimized graph and count integer GEMMs
        explicit: bool = True  # static QDQ linears ORT would fuse into a float Gemm → explicit MatMulInteger

    requires_properties = (QUANTIZED,)
    ensures_properties = (LOWERED_ORT,)

    def call(self, model):
        self._explicit_done = False
        return self._lower(model)

    def _lower(self, model):
        graph = model.graph
        quantized, weights = 0, {}
        for node in graph:
            if node.op_type == "MatMulInteger":
                b = node.inputs[1]
                if b.const_value is not None and b.const_value.dtype != ir.DataType.INT8:
                    self.fail("integer GEMM weights must be int8", node=node)
                quantized += 1
            elif node.op_type == "MatMul":
                x = node.inputs[0].producer()
                if x is not None and x.op_type == "DequantizeLinear":
                    zp = x.inputs[2] if len(x.inputs) > 2 else None
                    if zp is None or zp.const_value is None or zp.const_value.dtype != ir.DataType.UINT8:
                        self.fail("activations must be uint8 for ORT's u8×s8 integer kernels", node=node,
                                  hint="quantize activations asymmetrically to uint8")
                    if _weight_dtype(node) != ir.DataType.INT8:
                        self.fail("weights must be int8 for ORT's u8×s8 integer kernels", node=node)
                    quantized += 1
                    weights[_weight_name(node)] = node
        self.stats["integer_linears"] = quantized
        report = {"integer_linears": quantized}
        if self.options.verify and quantized:
            used: set[str] = set()
            counts = ort_integer_kernels(model, used)
            on_int = sum(counts[k] for k in INTEGER_GEMMS)
            missed = [n.name for w, n in weights.items() if w not in used]
            report["ort_integer_gemms"] = on_int
            report["ort_ops"] = dict(counts.most_common())
            self.stats["ort_integer_gemms"] = on_int
            if on_int < quantized:
                names = [n.name for n in graph if n.op_type in ("MatMul", "MatMulInteger") and n.name]
                slow = _not_on_integer_kernels(names, ort_optimized_nodes(model))
                if self.options.explicit and not self._explicit_done:
                    from lowbit.backends.ort_explicit import explicit_integer_linear

                    self._explicit_done = True
                    by_name = {n.name: n for n in graph}
                    todo = {n.name for n in weights.values() if n.name and _weight_name(n) not in used}
                    todo |= {name for name, _ in slow}
                    rewritten = sum(explicit_integer_linear(graph, by_name[name], self.name)
                                    for name in sorted(todo) if name in by_name)
                    if rewritten:
                        self.stats["explicit_integer_linears"] = rewritten
                        self._lower(model)
                        self.ctx.report["lower-ort"]["explicit_integer_linears"] = rewritten
                        return PassResult(model, modified=True)
                which = (": " + ", ".join(f"'{n}' runs as {op}" for n, op in slow[:3])
                         + (f" and {len(slow) - 3} more" if len(slow) > 3 else "")) if slow else ""
                floats = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
                gemm = any(op in ("Gemm", "FusedGemm") for _, op in slow)
                self.fail(f"ORT runs only {on_int} of {quantized} quantized linears on integer kernels"
                          + (f"; float kernels for {floats}" if missed else "") + which
                          + (" (ORT fuses a fixed-shape MatMul + bias into Gemm before its QDQ fusion)" if gemm else ""),
                          node=None if not slow else next(n for n in graph if n.name == slow[0][0]),
                          hint="use --recipe w8a8-dynamic (per-token activations run on MatMulInteger whatever the "
                               "shapes), or give the model dynamic input shapes; 'lowbit inspect --ort-optimized' "
                               "shows what ORT runs")
        self.ctx.report["lower-ort"] = report
        return PassResult(model, modified=False)
