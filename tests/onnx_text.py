"""Before/Expected helpers: models written as ONNX text (``onnx.parser``), compared structurally.

``expect(before_text, pipeline, expected)`` runs ``pipeline`` on the parsed Before model and
compares the result with Expected: ONNX text (same ops in the same order, same wiring by position,
same graph inputs/outputs), the string ``"same"`` (must not fire: the serialized model is
unchanged byte for byte) or an exception type (must refuse).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

from lowbit.passmanager.manager import CompileContext, PassManager

__all__ = ["parse", "digest", "structure", "expect", "run", "HEADER"]

HEADER = '<ir_version: 10, opset_import: ["" : 23]>'


def parse(text: str) -> ir.Model:
    text = text.strip()
    if not text.startswith("<"):
        text = f"{HEADER}\n{text}"
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def digest(model: ir.Model) -> str:
    from lowbit.ir.sessions import to_proto

    return hashlib.sha256(to_proto(model).SerializeToString(deterministic=True)).hexdigest()


def structure(model: ir.Model) -> list[tuple]:
    """Nodes in order as (domain, op, inputs, outputs), values named by producer position or kind."""
    graph = model.graph
    index = {n: i for i, n in enumerate(graph)}
    inputs = {v: f"in{i}" for i, v in enumerate(graph.inputs)}

    def ref(v):
        if v is None:
            return "-"
        if v in inputs:
            return inputs[v]
        node = v.producer()
        if node is not None:
            return f"n{index[node]}.{list(node.outputs).index(v)}"
        if v.const_value is not None:
            return f"const{tuple(v.const_value.shape)}:{v.const_value.dtype.name}"
        return "?"

    rows = [((n.domain or ""), n.op_type, tuple(ref(v) for v in n.inputs)) for n in graph]
    rows.append(("outputs", tuple(ref(v) for v in graph.outputs)))
    return rows


def run(model: ir.Model, pipeline: str, ctx: CompileContext | None = None) -> tuple[ir.Model, PassManager]:
    ctx = ctx or CompileContext(show_progress=False)
    pm = PassManager.from_pipeline(pipeline, ctx)
    return pm.run(model), pm


def expect(before: str, pipeline: str, expected, ctx: CompileContext | None = None, match: str | None = None,
           prepare=None):
    """Run and compare; returns the result model (or None for a refusal)."""
    model = parse(before)
    if prepare is not None:
        prepare(model)
    if isinstance(expected, type) and issubclass(expected, BaseException):
        with pytest.raises(expected, match=match):
            run(model, pipeline, ctx)
        return None
    want = digest(model) if expected == "same" else None
    out, _ = run(model, pipeline, ctx)
    if expected == "same":
        assert digest(out) == want, "the pass fired on a model it must leave alone"
    else:
        assert structure(out) == structure(parse(expected)), \
            f"got:\n{structure(out)}\nexpected:\n{structure(parse(expected))}"
    return out


def ort_outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from lowbit.ir.sessions import make_session

    return make_session(model, optimize=False).run(None, feeds)
