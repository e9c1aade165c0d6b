"""Bit-exact comparison of a TVM build of an integer-only graph with the numpy reference.

``compare_graph_with_tvm(model, feeds)`` compiles ``model`` (still holding its ``lowbit`` ops)
with ``lower-tvm``'s lowering, exposing as outputs every ``lowbit`` op's result and every value
the reference has no semantics for but needs (the float embedding, RoPE attention, shape
arithmetic).  Walking the graph in order, the reference computes every node it supports from
values it computed itself, so an error propagates and is caught downstream; every integer value
that both sides produce is compared bit for bit.  Intermediate values inside fused kernels (the
int32 accumulator of a GEMM with its requantize in the epilogue) are not outputs: the fused
kernel is checked through its requantized result.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx_ir as ir

from lowbit.runtime.reference import ReferenceInterpreter

__all__ = ["compare_graph_with_tvm", "exposed_values"]

logger = logging.getLogger(__name__)


def exposed_values(model: ir.Model) -> list[str]:
    """Names the TVM build must output: lowbit ops' results and what the reference takes from outside."""
    known: set[str] = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    wanted: list[str] = []
    for node in model.graph:
        if ReferenceInterpreter.supports(node):
            for v in node.inputs:
                if v is not None and v.const_value is None and v.name not in known and v.name not in wanted:
                    wanted.append(v.name)  # taken from TVM, so the reference can compute this node
            known.update(o.name for o in node.outputs)
        for o in node.outputs:
            if node.domain == "lowbit" and o.name not in wanted:
                wanted.append(o.name)
    return wanted


def compare_graph_with_tvm(model: ir.Model, feeds: list[Mapping[str, np.ndarray]], target: str = "llvm",
                           out_dir: str | Path | None = None, run: Callable | None = None):
    """(values compared, mismatches) of TVM against the reference over ``feeds`` (one static shape).

    ``target`` "llvm" compiles for this host and runs in process; a device target of
    :data:`lowbit.backends.tvm_integer_export.DEVICE_TARGETS` ("aarch64-linux") cross-compiles, and
    ``run(lib_path, feeds) -> [{output name: array}]`` runs the library there (e.g. under qemu).
    """
    from lowbit.backends.tvm_integer import fold_static_shapes

    shapes = {k: list(np.asarray(v).shape) for k, v in feeds[0].items()}
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    fold_static_shapes(model, shapes)  # what lower-tvm compiles; the reference walks the same nodes
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    have = {v.name for v in copy.graph.outputs}
    values = {o.name: o for n in copy.graph for o in n.outputs}
    for name in exposed_values(copy):
        if name not in have and name in values:
            copy.graph.outputs.append(values[name])
    for node in copy.graph:  # a lowbit op's result type: its zero point's (Requantize, IntNorm), table's, or uint8
        out = node.outputs[0]
        if node.domain == "lowbit" and out.dtype is None:
            src = {"Requantize": 3, "IntNorm": 4, "Lookup": 1}.get(node.op_type)
            out.dtype = ir.DataType.UINT8 if src is None else node.inputs[src].dtype
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        if target == "llvm":
            from lowbit.backends.tvm_lower import lower_tvm
            from lowbit.runtime.tvm_runner import TvmSession

            sess = TvmSession(lower_tvm(copy, target, folder, "check", shape_dict=shapes).lib)
            results = [dict(zip(sess.output_names, sess.run(None, dict(f)))) for f in feeds]
        else:
            from lowbit.backends.tvm_integer_export import export_tvm

            if run is None:
                raise ValueError(f"compare_graph_with_tvm: target {target!r} needs a run(lib, feeds) callable")
            results = run(export_tvm(copy, target, folder / "check", shapes).lib, [dict(f) for f in feeds])
        interp = ReferenceInterpreter(model)
        compared, mismatches = 0, []
        for i, feed in enumerate(feeds):
            got = results[i]
            env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feed.items()}
            for node in model.graph:
                ins = [None if v is None else env.get(v.name, v.const_value.numpy() if v.const_value is not None
                                                       else None) for v in node.inputs]
                ready = all(a is not None for v, a in zip(node.inputs, ins) if v is not None)
                if not (ready and interp.supports(node)):
                    for o in node.outputs:
                        if o.name in got:
                            env[o.name] = got[o.name]
                    continue
                for o, arr in zip(node.outputs, interp.run_node(node, ins)):
                    arr = np.asarray(arr)
                    env[o.name] = arr
                    if np.issubdtype(arr.dtype, np.integer) and o.name in got:
                        compared += 1
                        if got[o.name].dtype != arr.dtype or not np.array_equal(got[o.name], arr):
                            mismatches.append((i, o.name, int(np.sum(got[o.name] != arr))))
    return compared, mismatches
