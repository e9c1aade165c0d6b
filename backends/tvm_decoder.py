"""The KV-cache decoder graph on TVM: one artifact for every sequence and past length.

The generation graph (:mod:`lowbit.frontends.decoder`'s KV form: ``input_ids [b, seq]``,
``attention_mask [b, total]``, ``position_ids [b, seq]``, ``past_key_values.{i}.key/value
[b, kv, past, d]`` → ``logits``, ``present.*``) imports into TVM's Relax with symbolic ``seq``,
``past`` and ``total``, but the causal mask's ``Range(past, total)`` and ``Range(0, total)`` get
fresh length variables from TVM's importer, and ``total`` is a variable of its own: the mask then
cannot broadcast against the scores ``[.., seq, past + seq]`` and every shape after it is lost
(the importer's Reshape refuses a tensor of unknown shape).  :func:`symbolic_kv_form` rewrites a
copy of the graph so that every length is written in ``seq`` and ``past`` alone, using the KV
contract ``total = past + seq``:

* ``Range(start, limit, 1)`` whose bounds are shape arithmetic of the inputs becomes
  ``start + CumSum(ones[limit − start]) − 1``, the ones taken from the inputs themselves
  (``input_ids`` for ``seq``, the first past cache for ``past``, their concatenation for
  ``past + seq``), so TVM infers its length;
* ``attention_mask`` is read through ``Gather(attention_mask, 0..past+seq−1, axis=1)``, which has
  the length ``past + seq`` (and the same values when the caller keeps the contract);
* the batch is fixed to 1 (generation runs one sequence).

The rewrite is exact: the same values in the same graph, only the shape algebra changes.  A Range
whose bounds are not such arithmetic, or whose length is not ``seq``, ``past`` or ``past + seq``,
is refused naming the node.  :func:`lower_kv_tvm` then lowers through :func:`lower_tvm` with no
static shape, and :class:`lowbit.runtime.tvm_kv_session.TvmKVSession` runs it under ``generate``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.backends import tvm_lower
from lowbit.errors import LowbitError

__all__ = ["symbolic_kv_form", "import_kv_relax", "lower_kv_tvm", "PAST", "SEQ"]

logger = logging.getLogger(__name__)

PAST, SEQ = "past", "seq"  # the two length variables; total = past + seq
_PAST_PREFIX = "past_key_values."


def _lin(**terms) -> dict:
    return {k: v for k, v in terms.items() if v}


def _add(a: dict, b: dict, sign: int = 1) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + sign * v
    return {k: v for k, v in out.items() if v}


class _Rewriter:
    def __init__(self, model: ir.Model):
        self.model, self.graph = model, model.graph
        names = {v.name: v for v in self.graph.inputs}
        if "input_ids" not in names or "attention_mask" not in names or \
                not any(n.startswith(_PAST_PREFIX) for n in names):
            raise LowbitError("TVM KV lowering: the model is not a KV-cache graph (input_ids, attention_mask, "
                              "past_key_values.*)", hint="build it with kv_cache=True or 'lowbit compile --kv-cache'")
        self.ids, self.mask = names["input_ids"], names["attention_mask"]
        self.past0 = next(v for v in self.graph.inputs if v.name.startswith(_PAST_PREFIX))
        self.n = 0
        self.anchor = next(iter(self.graph))  # shape-only nodes go just above it, in creation order
        self._ones: dict[str, ir.Value] = {}

    # -- building -----------------------------------------------------------------------------
    def _node(self, op, inputs, before, **attrs) -> ir.Value:
        self.n += 1
        attributes = [ir.AttrInt64(k, v) if isinstance(v, int) else ir.AttrInt64s(k, v) for k, v in attrs.items()]
        node = ir.Node("", op, inputs, attributes=attributes, name=f"tvm_kv.{op.lower()}_{self.n}",
                       outputs=[ir.Value(name=f"tvm_kv.{op.lower()}_{self.n}")])
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def _const(self, arr, before) -> ir.Value:
        self.n += 1
        name = f"tvm_kv.c{self.n}"
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(np.asarray(arr), name=name))],
                       name=name, outputs=[ir.Value(name=name)])
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def _ones_of(self, x: ir.Value, axis: int, before) -> ir.Value:
        """int64 ones of length ``x.shape[axis]`` (reduced over the other axes, so TVM keeps the length)."""
        rank = len(x.shape)
        others = [a for a in range(rank) if a != axis]
        r = self._node("ReduceMax", [x, self._const(np.array(others, np.int64), before)], before, keepdims=0)
        false = self._node("Greater", [r, r], before)  # all false (NaN > NaN too)
        zero = self._node("Cast", [false], before, to=int(ir.DataType.INT64))
        return self._node("Add", [zero, self._const(np.array(1, np.int64), before)], before)

    def ones(self, length: str, before) -> ir.Value:
        if length not in self._ones:
            first = self.anchor
            if length == SEQ:
                self._ones[SEQ] = self._ones_of(self.ids, 1, first)
            elif length == PAST:
                self._ones[PAST] = self._ones_of(self.past0, 2, first)
            else:
                self._ones["total"] = self._node("Concat", [self.ones(PAST, first), self.ones(SEQ, first)], first,
                                                 axis=0)
        return self._ones[length]

    def arange(self, length: str, before) -> ir.Value:
        c = self._node("CumSum", [self.ones(length, before), self._const(np.array(0, np.int64), before)], before)
        return self._node("Sub", [c, self._const(np.array(1, np.int64), before)], before)

    def scalar(self, lin: dict, before) -> ir.Value:
        """``lin`` as an int64 scalar.  ``past`` is summed as ``Σ ones[past+seq] − Σ ones[seq]``: TVM 0.27's
        ReduceSum of an empty tensor (past = 0) does not return 0."""
        acc = self._const(np.array(lin.get("const", 0), np.int64), before)
        sums = {v: self._node("ReduceSum", [self.ones(v, before)], before, keepdims=0) for v in ("total", SEQ)}
        coef = {"total": lin.get(PAST, 0), SEQ: lin.get(SEQ, 0) - lin.get(PAST, 0)}
        for var, c in coef.items():
            if c:
                term = self._node("Mul", [sums[var], self._const(np.array(c, np.int64), before)], before)
                acc = self._node("Add", [acc, term], before)
        return acc

    # -- shape algebra --------------------------------------------------------------------------
    def dims_of(self, v: ir.Value) -> list[dict] | None:
        """Linear forms in past/seq of each dim of graph input ``v`` (batch = 1)."""
        rank = len(v.shape or [])
        dims = []
        for axis, d in enumerate(v.shape or []):
            if isinstance(d, int):
                dims.append(_lin(const=d))
            elif axis == 0:
                dims.append(_lin(const=1))
            elif v is self.ids or (v.name == "position_ids" and axis == 1):
                dims.append(_lin(seq=1))
            elif v is self.mask:
                dims.append(_lin(past=1, seq=1))
            elif v.name.startswith(_PAST_PREFIX) and axis == rank - 2:
                dims.append(_lin(past=1))
            else:
                return None
        return dims

    def value(self, v: ir.Value | None):
        """The shape arithmetic ``v`` computes: a list of linear forms (a shape), one form, or None."""
        if v is None:
            return None
        if v.const_value is not None:
            arr = v.const_value.numpy()
            if arr.dtype.kind not in "iu" or arr.ndim > 1:
                return None
            return _lin(const=int(arr)) if arr.ndim == 0 else [_lin(const=int(a)) for a in arr]
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op, ins = node.op_type, [self.value(i) for i in node.inputs[1:]]
        if op == "Shape" and node.inputs[0] in self.graph.inputs:
            return self.dims_of(node.inputs[0])
        src = self.value(node.inputs[0])
        if src is None:
            return None
        if op == "Slice" and isinstance(src, list) and len(node.inputs) in (3, 4) and \
                all(isinstance(i, list) and len(i) == 1 and set(i[0]) <= {"const"} for i in ins):
            s, e = (i[0].get("const", 0) for i in ins[:2])
            return src[s:e]
        if op == "Squeeze" and isinstance(src, list) and len(src) == 1:
            return src[0]
        if op in ("Add", "Sub") and isinstance(src, dict) and isinstance(ins[0], dict):
            return _add(src, ins[0], 1 if op == "Add" else -1)
        if op == "Constant":
            return None
        return None

    # -- rewriting ------------------------------------------------------------------------------
    def run(self) -> int:
        for v in self.graph.inputs:
            if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int):
                v.shape = ir.Shape([1, *list(v.shape)[1:]])
        anchor = self.anchor
        count = 0
        for node in list(self.graph):
            if node.op_type == "Range" and node.domain in ("", "ai.onnx"):
                self._range(node)
                count += 1
        users = [(u.node, u.idx) for u in self.mask.uses()]
        if users:
            kidx = self.arange("total", anchor)
            gathered = self._node("Gather", [self.mask, kidx], anchor, axis=1)
            for node, idx in users:
                node.replace_input_with(idx, gathered)
        return count

    def _range(self, node: ir.Node) -> None:
        start, limit, delta = (self.value(i) for i in node.inputs)
        if not (isinstance(start, dict) and isinstance(limit, dict) and delta == _lin(const=1)):
            raise LowbitError(f"TVM KV lowering: node '{node.name}' (Range): its bounds are not shape arithmetic "
                              "of the inputs", hint="the KV graph of lowbit's decoder frontends is supported")
        length = _add(limit, start, -1)
        key = {frozenset(_lin(seq=1).items()): SEQ, frozenset(_lin(past=1).items()): PAST,
               frozenset(_lin(past=1, seq=1).items()): "total"}.get(frozenset(length.items()))
        if key is None:
            raise LowbitError(f"TVM KV lowering: node '{node.name}' (Range) has length {length}, not seq, past or "
                              "past + seq", hint="the KV graph of lowbit's decoder frontends is supported")
        out = self.arange(key, node)
        if start:
            out = self._node("Add", [out, self.scalar(start, node)], node)
        dtype = node.outputs[0].dtype
        if dtype is not None and dtype != ir.DataType.INT64:
            out = self._node("Cast", [out], node, to=int(dtype))
        old = node.outputs[0]
        for use in list(old.uses()):
            use.node.replace_input_with(use.idx, out)
        if old in self.graph.outputs:
            raise LowbitError(f"TVM KV lowering: node '{node.name}' (Range) is a graph output")
        self.graph.remove(node, safe=True)


def symbolic_kv_form(model: ir.Model) -> int:
    """Rewrite ``model`` (a KV-cache decoder graph) in place as described in the module doc; returns the
    number of Range nodes rewritten."""
    count = _Rewriter(model).run()
    logger.info("symbolic_kv_form: %d Range node(s) rewritten", count)
    return count


def import_kv_relax(model, target: Any = "llvm"):
    """(IRModule, param arrays, meta) of a KV-cache decoder graph with symbolic lengths (see the module doc);
    :func:`lowbit.backends.tvm_lower.import_relax` without its static-shape requirement."""
    from lowbit.backends.tvm_prepare import prepare_for_tvm

    tgt = tvm_lower.make_target(target)
    m = tvm_lower._as_model(model)
    symbolic_kv_form(m)
    stats = prepare_for_tvm(m, layout="rows" if tgt.kind.name == "cuda" else "tiled")
    meta = {"kernels": "", "inputs": tvm_lower._value_info(m.graph.inputs),
            "outputs": tvm_lower._value_info(m.graph.outputs),
            "target": str(tgt), "device": "cuda" if tgt.kind.name == "cuda" else "cpu", "prepare": stats,
            "shape_dict": {}, "kv_cache": True, "tokenizer": m.metadata_props.get("lowbit.tokenizer")}
    shape_dict: dict = {}
    arrays = tvm_lower._lift_params(m, shape_dict)
    return tvm_lower.import_onnx(m, tgt, shape_dict), arrays, {**meta, "num_params": len(arrays)}


def lower_kv_tvm(model, target: Any = "llvm", out_dir: str | os.PathLike = "out", name: str = "model",
                 tuning_db: str | os.PathLike | None = None):
    """Lower a KV-cache decoder graph (``ir.Model`` or path) to one TVM artifact for every length."""
    mod, arrays, meta = import_kv_relax(model, target)
    return tvm_lower.export_artifact(tvm_lower.compile_relax(mod, target, tuning_db), arrays, meta, out_dir, name,
                                     tuning_db)


tvm_lower.KV_LOWERING.append(lower_kv_tvm)
