"""True-sequential calibration: each linear's XᵀX from inputs that already went through the
quantized earlier linears, computed incrementally.

Linears are ordered into stages by linear depth (the number of linears on the longest path from
the graph inputs to a linear's input: q/k/v of a block share a stage, then o, then gate/up, then
down).  The stream of calibration samples is cut after each stage: the *frontier* is every value
already computed that a not-yet-run node still reads (for a decoder: the residual stream, RoPE
tables, masks).  Stage ``s`` runs only the nodes between the frontier of stage ``s − 1`` and the
inputs of stage ``s`` — a small ONNX graph fed with the cached frontier — so every node of the
model runs once per sample over the whole pass instead of once per stage (the already-quantized
prefix is reused, never recomputed).  The caller quantizes stage ``s`` and writes its Ŵ back
(:meth:`SequentialCalibrator.set_weight`) before asking for stage ``s + 1``.

Padded positions (an ``attention_mask`` input) are kept out of XᵀX as in ``calibrate``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.quant.stats import ActStats, token_keep

__all__ = ["linear_stages", "SequentialCalibrator"]

logger = logging.getLogger(__name__)


def linear_stages(graph, linears) -> list[list]:
    """``linears`` grouped by linear depth, in execution order (onnx_ir graph, topologically sorted)."""
    depth: dict = {}
    by_node = {lin.node: lin for lin in linears}
    for node in graph:
        d = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        for out in node.outputs:
            depth[out] = d + (1 if node in by_node else 0)
    stages: dict[int, list] = {}
    for lin in linears:
        stages.setdefault(depth.get(lin.input, 0), []).append(lin)
    return [stages[k] for k in sorted(stages)]


class SequentialCalibrator:
    """Streams calibration samples through a float ONNX model one stage of linears at a time."""

    def __init__(self, proto: onnx.ModelProto, feeds: list[dict], threads: int = 0):
        self.proto = proto
        self.feeds = feeds
        self.threads = threads
        g = proto.graph
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.inits]
        self.producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        self.done: set[int] = set()
        self.cache: list[dict[str, np.ndarray]] = [dict() for _ in feeds]
        inferred = onnx.shape_inference.infer_shapes(proto)
        infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        self.types = {v.name: v.type.tensor_type.elem_type for v in infos}

    def set_weight(self, name: str, w: np.ndarray) -> None:
        """Replace an initializer (a quantized layer's Ŵ, float) for every later stage."""
        t = self.inits[name]
        t.CopyFrom(numpy_helper.from_array(np.asarray(w, numpy_helper.to_array(t).dtype), name))

    def _nodes_for(self, targets: list[str]) -> list[int]:
        nodes = self.proto.graph.node
        have = set(self.cache[0]) | set(self.graph_inputs) | set(self.inits)
        need, stack = set(), [t for t in targets if t not in have]
        while stack:
            v = stack.pop()
            i = self.producer.get(v)
            if i is None or i in need:
                continue
            need.add(i)
            stack += [x for x in nodes[i].input if x and x not in have]
        return sorted(need)

    def hessians(self, targets: list[str]) -> dict[str, np.ndarray]:
        """XᵀX (float64, padding excluded) of each value in ``targets``, given the weights set so far."""
        from lowbit.ir.sessions import make_session

        g = self.proto.graph
        idx = self._nodes_for(targets)
        self.done |= set(idx)
        produced = {o for i in idx for o in g.node[i].output if o}
        later_reads = {x for j, n in enumerate(g.node) if j not in self.done for x in n.input}
        keep = sorted((produced | set(self.cache[0])) & later_reads)
        outputs = sorted((set(targets) & produced) | (produced & set(keep)))  # a graph input is read from the feed
        ins = sorted({x for i in idx for x in g.node[i].input if x and x not in produced and x not in self.inits})
        used_inits = sorted({x for i in idx for x in g.node[i].input if x in self.inits})

        def info(name):
            return helper.make_tensor_value_info(name, self.types.get(name, onnx.TensorProto.FLOAT), None)

        sub = helper.make_model(
            helper.make_graph([g.node[i] for i in idx], "stage", [info(x) for x in ins], [info(x) for x in outputs],
                              [self.inits[x] for x in used_inits]),
            opset_imports=list(self.proto.opset_import), ir_version=min(self.proto.ir_version, 10))
        sub.functions.extend(self.proto.functions)
        sess = make_session(sub, optimize=False, threads=self.threads) if outputs else None
        stats: dict[str, ActStats] = {}
        for feed, cache in zip(self.feeds, self.cache):
            avail = {**feed, **cache}
            outs = dict(zip(outputs, sess.run(outputs, {x: avail[x] for x in ins}))) if sess is not None else {}
            for t in targets:
                x = outs[t] if t in outs else avail[t]
                st = stats.setdefault(t, ActStats(np.full(x.shape[-1], np.inf, np.float32),
                                                  np.full(x.shape[-1], -np.inf, np.float32)))
                st.update(x, hessian=True, sample=False, keep=token_keep(feed, x))
            for k in list(cache):
                if k not in keep:
                    del cache[k]
            cache.update({k: v for k, v in outs.items() if k in keep})
        logger.debug("stage: %d nodes, frontier %d values", len(idx), len(keep))
        return {t: stats[t].xtx for t in targets}
