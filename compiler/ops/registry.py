"""The ``lowbit`` operator domain: one registry of lowbit's own ONNX operators.

Every op is registered by decorating its numpy reference with :func:`lowbit_op`, which records,
side by side:

* ``name`` and ``version`` (the op's since-version in domain :data:`DOMAIN`; the domain's opset
  version is :data:`VERSION`);
* the *schema*: ``doc``, ``inputs``/``outputs`` as ``(name, type)`` pairs, where a type is either
  a constraint name of ``types`` or a concrete ``"tensor(...)"`` (an input may carry a third element
  ``"optional"``: the node may leave it out), and integer ``attributes``;
* the *numpy reference* (the truth), with one calling convention for every op:
  ``reference(*inputs, **attributes) -> np.ndarray`` (inputs and attributes in schema order);
* how it runs in plain ONNX, one or both of: ``function(opset) -> onnx.FunctionProto``, a body of
  standard ops that :func:`attach_functions` adds to a model; ``lower(graph, node, origin) ->
  ir.Value``, an in-graph lowering to standard ops that the ``lower-lowbit`` pass
  (:mod:`lowbit.backends.lower_lowbit`) emits before ``node``.

The ops are defined in :mod:`lowbit.ops.float_ops` (``MatMul3Bit``, ``Hadamard``: function
bodies) and :mod:`lowbit.ops.integer_ops` (``Requantize``, ``Lookup``: lowerings); importing this
module registers all of them.  :func:`register_schemas` makes ``onnx.checker`` know every op;
:mod:`lowbit.runtime.reference` runs every op through its registered reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["DOMAIN", "VERSION", "LowbitOp", "OPS", "lowbit_op", "get_op", "reference_for", "attach_functions",
           "register_schemas"]

DOMAIN = "lowbit"
VERSION = 1  # the domain's opset version: the largest since-version of its ops


@dataclass(frozen=True)
class LowbitOp:
    name: str
    version: int
    doc: str
    inputs: tuple[tuple[str, str], ...]  # (name, type constraint or "tensor(...)")
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[str, ...]  # integer attributes
    types: tuple[tuple[str, tuple[str, ...]], ...]  # type constraint → allowed "tensor(...)" types
    reference: Callable[..., np.ndarray]  # (*inputs, **attributes) -> output
    function: Callable[[int], onnx.FunctionProto] | None = None  # (default-domain opset) -> body
    lower: Callable[[ir.Graph, ir.Node, str], ir.Value] | None = None  # (graph, node, origin) -> new output


OPS: dict[str, LowbitOp] = {}


def lowbit_op(name: str, *, doc: str, inputs, outputs, types: dict[str, list[str]], attributes=(), version: int = 1,
              function: Callable | None = None, lower: Callable | None = None):
    """Register the decorated numpy reference as lowbit op ``name`` with its schema and ONNX forms."""
    if function is None and lower is None:
        raise ValueError(f"lowbit.{name}: needs a function body or a lowering to run in plain ONNX")
    if not 1 <= version <= VERSION:
        raise ValueError(f"lowbit.{name}: version {version} is outside the domain's opset 1..{VERSION}")
    for io_name, ty, *_ in (*inputs, *outputs):
        if ty not in types and not ty.startswith("tensor("):
            raise ValueError(f"lowbit.{name}: '{io_name}' has type '{ty}', neither a constraint nor a tensor type")

    def deco(reference):
        if name in OPS:
            raise ValueError(f"lowbit.{name} is registered twice")
        OPS[name] = LowbitOp(name, version, doc, tuple(map(tuple, inputs)), tuple(map(tuple, outputs)),
                             tuple(attributes), tuple((k, tuple(v)) for k, v in types.items()), reference, function,
                             lower)
        return reference

    return deco


def get_op(op_type: str) -> LowbitOp:
    op = OPS.get(op_type)
    if op is None:
        raise KeyError(f"lowbit.{op_type} is not a registered lowbit op (known: {', '.join(sorted(OPS))})")
    return op


def reference_for(op_type: str) -> Callable[..., np.ndarray]:
    return get_op(op_type).reference


def attach_functions(model: ir.Model) -> None:
    """Give ``model`` the function bodies of the lowbit ops it uses, and the ``lowbit`` opset."""
    used = {n.op_type for n in model.graph if n.domain == DOMAIN}
    with_body = sorted(name for name in used if name in OPS and OPS[name].function is not None)
    if not with_body:
        return
    model.opset_imports[""] = max(model.opset_imports.get("", 21), 21)
    model.opset_imports[DOMAIN] = VERSION
    for name in with_body:
        fn = ir.serde.deserialize_function(OPS[name].function(model.opset_imports[""]))
        model.functions[fn.identifier()] = fn


def register_schemas() -> None:
    """Register every op's schema with ``onnx.defs`` so the checker validates nodes that use them."""
    from onnx.defs import OpSchema

    for op in OPS.values():
        if onnx.defs.has(op.name, DOMAIN):
            continue
        used = {ty for _, ty, *_ in (*op.inputs, *op.outputs)}
        option = OpSchema.FormalParameterOption
        schema = OpSchema(op.name, DOMAIN, op.version, doc=op.doc,
                          inputs=[OpSchema.FormalParameter(n, ty, param_option=option.Optional if flag == ["optional"]
                                                           else option.Single) for n, ty, *flag in op.inputs],
                          outputs=[OpSchema.FormalParameter(n, ty) for n, ty in op.outputs],
                          type_constraints=[(k, list(v), k) for k, v in op.types if k in used],
                          attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, a) for a in op.attributes])
        onnx.defs.register_schema(schema)

