"""Control-flow subgraphs (If / Loop / Scan bodies) as the passes see them: from outside.

lowbit's passes rewrite the main graph only.  A subgraph that reads a main-graph value (a weight, a
norm's output) is opaque to them: a linear inside it stays float, and a rewrite that changes what
the value means (rotation) would leave the subgraph computing with the old meaning.  These helpers
name the owner node of such reads, so that a pass can refuse or report instead of guessing.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["subgraph_owners", "subgraph_readers", "subgraph_linears", "fence_subgraph_reads"]


def _walk(graph: ir.Graph, owner: ir.Node, out: dict[ir.Node, ir.Node]) -> None:
    for node in graph:
        out[node] = owner
        for attr in node.attributes.values():
            for sub in _graphs(attr):
                _walk(sub, owner, out)


def _graphs(attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def subgraph_owners(graph: ir.Graph) -> dict[ir.Node, ir.Node]:
    """Every node inside a subgraph (at any depth) → the node of ``graph`` that owns the subgraph."""
    out: dict[ir.Node, ir.Node] = {}
    for node in graph:
        for attr in node.attributes.values():
            for sub in _graphs(attr):
                _walk(sub, node, out)
    return out


def subgraph_readers(value: ir.Value, owners: dict[ir.Node, ir.Node]) -> list[ir.Node]:
    """The main-graph nodes (If, Loop, Scan) whose subgraphs read ``value``."""
    found = []
    for use in value.uses():
        owner = owners.get(use.node)
        if owner is None and use.node.op_type == "Identity" and use.node.name.endswith(".fence"):
            owner = next(iter(subgraph_readers(use.node.outputs[0], owners)), None)  # through the fence
        if owner is not None and owner not in found:
            found.append(owner)
    return found


def subgraph_linears(graph: ir.Graph) -> list[dict[str, str]]:
    """``{"layer", "reason"}`` for each MatMul inside a subgraph whose weight is a constant (an initializer
    of any scope, possibly through a Transpose): linears the passes leave in float."""
    out = []
    for node, owner in subgraph_owners(graph).items():
        if node.op_type != "MatMul" or len(node.inputs) != 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        src = w.producer()
        if src is not None and src.op_type == "Transpose":
            w = src.inputs[0]
        if w is not None and w.const_value is not None:
            out.append({"layer": node.name or w.name or "?",
                        "reason": f"inside the subgraph of {owner.op_type} '{owner.name}' (control flow is left "
                                  "in float; lowbit rewrites the main graph only)"})
    return out


def fence_subgraph_reads(graph: ir.Graph) -> int:
    """Give every subgraph its own copy of each main-graph value it reads that the main graph reads too:
    ``Identity(v)`` for computed values (a pass that retypes ``v`` — an integer norm output — then sees a float
    consumer, not a silent subgraph read), a copied initializer for constants (a pass that scales or quantizes
    the main graph's weight in place leaves the subgraph's copy alone).  Exact; returns the number of copies.
    Idempotent: a fence's output and a weight read only by subgraphs are left as they are."""
    owners = subgraph_owners(graph)
    copies = 0
    for owner in list(graph):
        inner = [n for n, o in owners.items() if o is owner]
        outer: list[ir.Value] = []
        for node in inner:
            for v in node.inputs:
                if v is None or v in outer or owners.get(v.producer()) is not None:
                    continue
                if v.producer() is None and v not in graph.inputs and v.name not in graph.initializers:
                    continue  # a subgraph's own input or initializer
                if v.const_value is not None and v.producer() is None:
                    if any(u.node not in owners for u in v.uses()):  # a weight the main graph reads too
                        outer.append(v)
                elif not (v.producer() is not None and v.producer().name.endswith(".fence")):
                    outer.append(v)  # computed: a pass may retype its producer (an integer norm)
        for v in outer:
            if v.const_value is not None and v.producer() is None:
                copy = ir.Value(name=f"{v.name}.{owner.name}", const_value=ir.Tensor(v.const_value.numpy().copy()),
                                shape=v.shape, type=v.type)
                graph.register_initializer(copy)
            else:
                fence = ir.Node("", "Identity", [v], name=f"{v.name}.{owner.name}.fence")
                graph.insert_before(owner, fence)
                copy = fence.outputs[0]
                copy.name, copy.shape, copy.type = f"{v.name}.{owner.name}", v.shape, v.type
            for use in list(v.uses()):
                if owners.get(use.node) is owner:
                    use.node.replace_input_with(use.idx, copy)
            copies += 1
    return copies
