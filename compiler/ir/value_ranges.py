"""Finite abs-max of chosen values of a graph over sample inputs (ORT runs the graph as it is now).

Unlike per-channel calibration statistics, one number per value: shapes may differ between samples
(attention scores are [B, H, S, S]), and ±inf (masks) is ignored.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.ops.registry import DOMAIN, OPS

__all__ = ["absmax"]

logger = logging.getLogger(__name__)


def absmax(model: ir.Model, values: list[ir.Value], feeds: list[dict]) -> dict[str, float]:
    """{value name: max |x| over every finite element of every sample}."""
    from lowbit.ir.sessions import make_session

    out = {v.name: _const_absmax(v.const_value.numpy()) for v in values if v.const_value is not None}
    values = [v for v in values if v.const_value is None]  # constants (an exporter's folded position table)
    names = list(dict.fromkeys(v.name for v in values))
    if not names:
        return out
    if any(n.domain == DOMAIN for n in model.graph):  # ORT runs lowbit ops through their lowerings, on a copy
        model = _lowered_copy(model)
        by_name = {o.name: o for n in model.graph for o in n.outputs} | {v.name: v for v in model.graph.inputs}
        values = [by_name[n] for n in names]
    added = [v for v in dict.fromkeys(values) if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        sess = make_session(model, optimize=False)
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    out.update(dict.fromkeys(names, 0.0))
    for feed in feeds:
        for n, x in zip(names, sess.run(names, feed)):
            x = np.abs(np.asarray(x, np.float64))
            x = x[np.isfinite(x)]
            if x.size:
                out[n] = max(out[n], float(x.max()))
    logger.debug("ranges of %d values over %d samples", len(names), len(feeds))
    return out


def _const_absmax(x: np.ndarray) -> float:
    x = np.abs(np.asarray(x, np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def _lowered_copy(model: ir.Model) -> ir.Model:
    copy = model.clone()  # keeps external tensors' base folders (a serialize round trip loses them)
    graph = copy.graph
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        out = OPS[node.op_type].lower(graph, node, "value-ranges")
        old = node.outputs[0]
        if old in graph.outputs:
            graph.outputs[graph.outputs.index(old)] = out
        old.replace_all_uses_with(out)
        old.name, out.name = f"{old.name}_lowered", old.name
        graph.remove(node, safe=True)
    return copy
