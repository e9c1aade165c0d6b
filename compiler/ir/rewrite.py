"""IR editing helpers shared by passes: constants, initializers, node creation with provenance."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["replace_value", "set_input_const", "add_initializer", "make_node", "unique_name", "ensure_opset", "replace_uses_in"]


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = graph.meta.setdefault("lowbit.names", None)
    if taken is None:
        taken = {v.name for v in graph.initializers.values()}
        for node in graph:
            taken.update(o.name for o in node.outputs if o.name)
            if node.name:
                taken.add(node.name)
        taken.update(v.name for v in graph.inputs)
        graph.meta["lowbit.names"] = taken
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, base)
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array, order="C"), name=name))
    value.shape = value.const_value.shape
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def set_input_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> ir.Value:
    """Give ``node.inputs[index]`` a new constant value.

    The initializer is replaced in place when this node is its only user; otherwise a new
    initializer is made for this node alone, so that shared weights (tied embeddings) stay intact.
    """
    value = node.inputs[index]
    array = np.asarray(array.astype(value.const_value.numpy().dtype, copy=False), order="C")
    users = list(value.uses())
    if len(users) == 1 and value.is_initializer() and value not in graph.inputs:
        value.const_value = ir.tensor(array, name=value.name)
        return value
    new = add_initializer(graph, value.name or "const", array)
    node.replace_input_with(index, new)
    return new


def make_node(graph: ir.Graph, op_type: str, inputs, *, origin: str, name: str, attributes=None,
              domain: str = "", num_outputs: int = 1, before: ir.Node | None = None) -> ir.Node:
    """Create a node tagged with the pass that made it (``metadata_props['lowbit.origin']``)."""
    node_name = unique_name(graph, name)
    attrs = [ir.AttrInt64(k, v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool)
             else ir.AttrFloat32(k, float(v)) if isinstance(v, float)
             else ir.AttrInt64s(k, list(v)) if isinstance(v, (list, tuple))
             else v for k, v in (attributes or {}).items()]
    outputs = [ir.Value(name=unique_name(graph, f"{node_name}_out" if num_outputs == 1 else f"{node_name}_out{i}"))
               for i in range(num_outputs)]
    node = ir.Node(domain, op_type, inputs, attributes=attrs, outputs=outputs, name=node_name)
    node.metadata_props["lowbit.origin"] = origin
    if before is not None:
        graph.insert_before(before, node)
    else:
        graph.append(node)
    return node


def replace_uses_in(nodes, old: ir.Value, new: ir.Value) -> None:
    """Rewire the given nodes' inputs from ``old`` to ``new``."""
    for node in nodes:
        for i, inp in enumerate(node.inputs):
            if inp is old:
                node.replace_input_with(i, new)


def ensure_opset(model: ir.Model, version: int, what: str) -> None:
    """Refuse a model whose default-domain opset is below ``version`` (frontends upgrade to 21)."""
    from lowbit.errors import UnsupportedModelError

    have = model.opset_imports.get("", 1)
    if have < version:
        raise UnsupportedModelError(f"{what} needs opset >= {version}, the model has opset {have}",
                                    hint="load the model through lowbit's frontend, which upgrades it")


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name, type and shape."""
    was_output = old in graph.outputs
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output:
        new.dtype, new.shape = old.dtype, old.shape
        name = old.name
        old.name = f"{name}_replaced"
        new.name = name
