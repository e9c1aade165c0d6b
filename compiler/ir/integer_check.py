"""Integer-region checker: which subgraphs are integer-only, and where float begins and ends.

Every value gets an element type by forward propagation (initializers, graph inputs, and per-op
rules; ``value.dtype`` where the op is unknown).  A node is *integer* when all its inputs and
outputs are integer-typed.  An *integer region* is a connected component of integer nodes joined
by integer values that contains quantized compute (MatMulInteger, a lowbit op, or an integer
source).  Its *entries* are float→integer boundary nodes (QuantizeLinear) feeding it, its *exits*
integer→float boundary nodes (DequantizeLinear, Cast to float) reading it.

What is proven.  Inside a region no op has a float input or output, so there is no float op
between the region's integer inputs and its integer outputs.  Between regions the checker walks
each float segment (exit → float ops → entry) and lists its ops; a segment made only of
rescaling ops (Mul/Div/Round/Cast/Clip/Q/DQ by constants) is a *float rescale between integer
tensors* — the thing ``dyadic`` removes — and is reported as a violation.

Shares.  ``integer_op_share``: nodes whose outputs are integer and whose inputs are not float, over
those plus the nodes touching a float tensor.  ``integer_mac_share``: of the per-token
multiply-adds of constant-weight GEMMs (K·N per weight), the share in ``MatMulInteger``; GEMMs of
two activations (Q·Kᵀ, P·V, whose cost grows with the sequence) are counted apart, integer/float.  Index arithmetic
(shapes, token ids, masks) is integer but not quantized compute; it is not counted as a region.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lowbit.ops.registry import DOMAIN

__all__ = ["IntegerRegion", "IntegerReport", "check_integer_regions", "value_types"]

_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_SAME_AS_FIRST = {"Add", "Sub", "Mul", "Div", "Min", "Max", "Clip", "BitShift", "Neg", "Abs", "Relu", "Identity",
                  "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Concat", "Gather",
                  "Where", "Mod", "Pad", "Tile", "Split", "ReduceSum", "ReduceMax", "Erf", "Tanh", "Sigmoid",
                  "LayerNormalization", "RMSNormalization", "Softmax", "Gelu", "MatMul", "Pow", "Sqrt", "Round"}
_QUANT_COMPUTE = {"MatMulInteger", "ConvInteger"}
_RESCALE_OPS = {"Mul", "Div", "Round", "Cast", "Clip", "QuantizeLinear", "DequantizeLinear", "Add", "Sub", "Floor"}


def _is_int(t: ir.DataType | None) -> bool:
    return t is not None and t not in _FLOAT and t not in (ir.DataType.BOOL, ir.DataType.STRING, ir.DataType.UNDEFINED)


def value_types(graph: ir.Graph) -> dict[ir.Value, ir.DataType | None]:
    types: dict[ir.Value, ir.DataType | None] = {}
    for v in list(graph.inputs) + list(graph.initializers.values()):
        types[v] = v.const_value.dtype if v.const_value is not None else v.dtype
    for node in graph:
        ins = [types.get(v, v.dtype if v is not None else None) if v is not None else None for v in node.inputs]
        for v in node.inputs:
            if v is not None and v not in types and v.const_value is not None:
                types[v] = v.const_value.dtype
        op = node.op_type
        if node.domain == DOMAIN:
            t = ins[3] if op == "Requantize" and len(ins) > 3 else node.outputs[0].dtype
        elif op == "QuantizeLinear":
            t = ins[2] if len(ins) > 2 and ins[2] is not None else ir.DataType.UINT8
        elif op == "DequantizeLinear":
            t = ins[1]
        elif op in ("MatMulInteger", "ConvInteger"):
            t = ir.DataType.INT32
        elif op == "Cast":
            t = ir.DataType(node.attributes["to"].value)
        elif op in ("Shape", "Size", "ArgMax", "NonZero"):
            t = ir.DataType.INT64
        elif op in ("Equal", "Less", "Greater", "And", "Or", "Not", "IsNaN", "IsInf", "GreaterOrEqual",
                    "LessOrEqual"):
            t = ir.DataType.BOOL
        elif op == "Where":
            t = ins[1]
        elif op == "Gather" or op == "GatherND":
            t = ins[0]
        elif op in _SAME_AS_FIRST:
            t = ins[0]
        else:
            t = node.outputs[0].dtype
        for o in node.outputs:
            types[o] = o.dtype if o.dtype is not None and op not in _SAME_AS_FIRST | {"QuantizeLinear"} else t
    return types


@dataclass
class IntegerRegion:
    nodes: list[ir.Node]
    entries: list[ir.Node] = field(default_factory=list)  # float -> integer boundary nodes
    exits: list[ir.Node] = field(default_factory=list)  # integer -> float boundary nodes

    @property
    def ops(self) -> Counter:
        return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in self.nodes)


@dataclass
class IntegerReport:
    regions: list[IntegerRegion]
    float_segments: list[dict]  # {"from": exit node, "to": entry node, "ops": [...]}
    float_rescales: list[dict]  # segments that only rescale: violations
    float_gemms: list[str]  # MatMuls with a quantized (DequantizeLinear) weight left in float
    float_ops: Counter = field(default_factory=Counter)  # ops with a float input or output (boundaries included)
    integer_ops: int = 0  # nodes with an integer output and no float input or output (shape arithmetic included)
    gemm_macs: dict = field(default_factory=dict)  # per-token multiply-adds of constant-weight GEMMs: integer/float
    activation_gemms: dict = field(default_factory=dict)  # GEMMs of two activations (attention): integer/float

    @property
    def integer_op_share(self) -> float:
        n = self.integer_ops + sum(self.float_ops.values())
        return self.integer_ops / n if n else 1.0

    @property
    def integer_mac_share(self) -> float:
        """Share of the per-token multiply-adds of constant-weight GEMMs that run on integers."""
        n = self.gemm_macs.get("integer", 0) + self.gemm_macs.get("float", 0)
        return self.gemm_macs.get("integer", 0) / n if n else 1.0

    @property
    def integer_gemms(self) -> int:
        return sum(r.ops["MatMulInteger"] for r in self.regions)

    def summary(self) -> dict:
        stays_float = self.float_ops
        return {"integer_regions": len(self.regions), "integer_gemms": self.integer_gemms,
                "region_ops": dict(sum((r.ops for r in self.regions), Counter())),
                "float_boundaries": sum(len(r.exits) for r in self.regions),
                "float_segments": len(self.float_segments), "stays_float_ops": dict(stays_float),
                "float_rescales": len(self.float_rescales), "float_gemms": len(self.float_gemms),
                "integer_op_share": round(self.integer_op_share, 4), "integer_mac_share": round(self.integer_mac_share, 4),
                "activation_gemms": dict(self.activation_gemms)}


def check_integer_regions(model: ir.Model) -> IntegerReport:
    graph = model.graph
    types = value_types(graph)
    is_int = lambda v: v is None or _is_int(types.get(v))  # noqa: E731
    int_nodes = [n for n in graph if all(is_int(v) for v in n.inputs) and all(is_int(o) for o in n.outputs)]
    members = set(map(id, int_nodes))
    parent = {id(n): id(n) for n in int_nodes}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    entries_of: dict[int, list[ir.Node]] = {}
    for n in graph:
        if n.op_type in ("QuantizeLinear",) or (n.op_type == "Cast" and not is_int(n.inputs[0]) and is_int(n.outputs[0])):
            for use in n.outputs[0].uses():
                if id(use.node) in members:
                    entries_of.setdefault(id(use.node), []).append(n)
    for n in int_nodes:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in members:
                parent[find(id(p))] = find(id(n))
    comps: dict[int, IntegerRegion] = {}
    for n in int_nodes:
        comps.setdefault(find(id(n)), IntegerRegion([])).nodes.append(n)
    regions = []
    for region in comps.values():
        ids = set(map(id, region.nodes))
        region.entries = list({id(e): e for n in region.nodes for e in entries_of.get(id(n), [])}.values())
        exits = {}
        for n in region.nodes:
            for o in n.outputs:
                for use in o.uses():
                    if id(use.node) not in ids and not all(is_int(x) for x in use.node.outputs):
                        exits[id(use.node)] = use.node
        region.exits = list(exits.values())
        quantized = region.entries or any(n.op_type in _QUANT_COMPUTE or n.domain == DOMAIN for n in region.nodes)
        if quantized:
            regions.append(region)
    segments, rescales = _float_segments(graph, regions, is_int)
    float_gemms = [n.name for n in graph if n.op_type == "MatMul" and n.inputs[1] is not None
                   and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"]
    float_ops = Counter(n.op_type for n in graph if any(not is_int(v) and types.get(v) in _FLOAT
                                                        for v in list(n.inputs) + list(n.outputs)))
    integer_ops = sum(1 for n in graph if all(is_int(o) for o in n.outputs) and not any(
        types.get(v) in _FLOAT for v in n.inputs if v is not None))
    macs, act = Counter(), Counter()
    for n in graph:
        if n.op_type not in ("MatMul", "MatMulInteger", "Gemm"):
            continue
        kind = "integer" if n.op_type == "MatMulInteger" else "float"
        w = n.inputs[1]
        wp = w.producer() if w is not None else None
        if wp is not None and wp.op_type == "DequantizeLinear":  # QDQ weight: still a constant
            w = wp.inputs[0]
        if w is not None and w.const_value is not None and len(w.const_value.shape) == 2:
            macs[kind] += int(np.prod(w.const_value.shape))
        else:
            act[kind] += 1
    return IntegerReport(regions, segments, rescales, float_gemms, float_ops, integer_ops, dict(macs), dict(act))


def _float_segments(graph: ir.Graph, regions: list[IntegerRegion], is_int) -> tuple[list[dict], list[dict]]:
    """Walk forward from each region exit through float ops to the next integer entries."""
    entry_ids = {id(e) for r in regions for e in r.entries}
    segments, rescales = [], []
    for r in regions:
        for ex in r.exits:
            ops, stack, seen, reached = Counter(), [ex], set(), []
            nonrescale = False
            while stack:
                n = stack.pop()
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if id(n) in entry_ids and n is not ex:
                    reached.append(n)
                    continue
                ops[n.op_type] += 1
                if n.op_type not in _RESCALE_OPS or sum(v is not None and v.const_value is None
                                                         for v in n.inputs) > 1:
                    nonrescale = True
                for o in n.outputs:
                    if o in graph.outputs:
                        reached.append(None)
                    for use in o.uses():
                        stack.append(use.node)
            seg = {"from": ex.name, "to": [e.name if e is not None else "<graph output>" for e in reached],
                   "ops": {k: v for k, v in ops.items() if v}}
            segments.append(seg)
            if reached and all(e is not None for e in reached) and not nonrescale:
                rescales.append(seg)
    return segments, rescales
