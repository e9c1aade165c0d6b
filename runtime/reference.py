"""Bit-exact numpy reference interpreter for the ops lowbit emits in integer regions.

Integer semantics are those of ONNX as ORT implements them, and are what a device runtime must
reproduce: integer Add/Sub/Mul wrap modulo 2^bits (numpy arrays of one dtype wrap the same way),
Div truncates towards zero, Cast between integer types wraps (no saturation), BitShift is defined
on unsigned types only, MatMulInteger accumulates exactly in int32.  The two boundary ops are
defined by ONNX as: QuantizeLinear ``sat(round_half_even(x / scale) + zp)`` and
DequantizeLinear ``(q − zp) · scale`` (float32).  ``lowbit`` domain ops run their registered numpy
reference, found in the one op registry (:mod:`lowbit.ops.registry`).

Float ops other than the boundaries are refused: the interpreter is the truth for integer
regions, not a general ONNX runtime.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.ops.registry import DOMAIN, OPS
from lowbit.ops.integer_ops import QRANGE

__all__ = ["ReferenceInterpreter", "REFERENCE_OPS", "UnsupportedReferenceOp", "compare_graph_with_ort",
           "compare_regions_with_ort"]


class UnsupportedReferenceOp(LowbitError):
    pass


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _per_axis(arr: np.ndarray, p: np.ndarray, axis: int) -> np.ndarray:
    if p.ndim == 0:
        return p
    shape = [1] * arr.ndim
    shape[axis % arr.ndim] = p.shape[0]
    return p.reshape(shape)


def _quantize(node, x, scale, zp=None):
    axis = _attr(node, "axis", 1)
    out_dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    zp = np.zeros((), out_dtype) if zp is None else zp
    q = np.rint(x.astype(np.float32) / _per_axis(x, scale.astype(np.float32), axis))
    lo, hi = QRANGE[np.dtype(out_dtype)]
    return np.clip(q + _per_axis(x, zp, axis).astype(np.float32), lo, hi).astype(out_dtype)


def _dequantize(node, q, scale, zp=None):
    axis = _attr(node, "axis", 1)
    zp = np.zeros((), q.dtype) if zp is None else zp
    d = q.astype(np.int32) - _per_axis(q, zp, axis).astype(np.int32)
    return (d.astype(np.float32) * _per_axis(q, scale.astype(np.float32), axis)).astype(np.float32)


def _matmul_integer(node, a, b, a_zp=None, b_zp=None):
    a32 = a.astype(np.int32) - (np.int32(0) if a_zp is None else a_zp.astype(np.int32))
    b32 = b.astype(np.int32) - (np.int32(0) if b_zp is None else b_zp.astype(np.int32))
    # exact sums, then wrapped to int32 like the kernel's accumulator.  float64 (BLAS) is exact while
    # every partial sum stays below 2^53: K·max|a|·max|b| < 2^53; otherwise int64 (slow, exact).
    k = a32.shape[-1]
    if k * int(np.abs(a32).max(initial=0)) * int(np.abs(b32).max(initial=0)) < 2 ** 53:
        return np.matmul(a32.astype(np.float64), b32.astype(np.float64)).astype(np.int64).astype(np.int32)
    return np.matmul(a32.astype(np.int64), b32.astype(np.int64)).astype(np.int32)


def _same_int(*xs):
    dt = xs[0].dtype
    for x in xs:
        if x.dtype != dt:
            raise UnsupportedReferenceOp(f"mixed dtypes {[str(y.dtype) for y in xs]} in an integer op")
    return dt


def _binary(fn):
    def run(node, a, b):
        dt = _same_int(a, b)
        with np.errstate(over="ignore"):
            return fn(a, b).astype(dt)
    return run


def _div(node, a, b):
    dt = _same_int(a, b)
    if np.issubdtype(dt, np.floating):
        return (a / b).astype(dt)
    q = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))
    return (np.sign(a.astype(np.int64)) * np.sign(b.astype(np.int64)) * q).astype(dt)


def _clip(node, x, lo=None, hi=None):
    out = x
    if lo is not None:
        out = np.maximum(out, lo.astype(x.dtype))
    if hi is not None:
        out = np.minimum(out, hi.astype(x.dtype))
    return out.astype(x.dtype)


def _cast(node, x):
    to = ir.DataType(_attr(node, "to")).numpy()
    if np.issubdtype(x.dtype, np.integer) and np.issubdtype(to, np.integer):
        return x.astype(to)  # wraps, as ONNX/ORT
    if np.issubdtype(to, np.integer):  # a boundary (round-and-clip quantizer): defined for in-range values
        info = np.iinfo(to)
        if np.any(~np.isfinite(x)) or np.any(x < info.min) or np.any(x > info.max):
            raise UnsupportedReferenceOp(f"Cast float→{to} of out-of-range values is undefined (node '{node.name}')")
        return np.trunc(x).astype(to)
    return x.astype(to)


def _bitshift(node, x, s):
    if not np.issubdtype(x.dtype, np.unsignedinteger):
        raise UnsupportedReferenceOp(f"BitShift on {x.dtype}: ONNX Runtime implements unsigned types only")
    s = s.astype(x.dtype)
    return (x >> s if _attr(node, "direction") == "RIGHT" else x << s).astype(x.dtype)


def _reshape(node, x, shape):
    shape = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def _transpose(node, x):
    perm = _attr(node, "perm")
    return np.transpose(x, perm)


REFERENCE_OPS: dict[tuple[str, str], Callable] = {
    ("", "QuantizeLinear"): _quantize,
    ("", "DequantizeLinear"): _dequantize,
    ("", "MatMulInteger"): _matmul_integer,
    ("", "Add"): _binary(np.add),
    ("", "Sub"): _binary(np.subtract),
    ("", "Mul"): _binary(np.multiply),
    ("", "Div"): _div,
    ("", "Min"): _binary(np.minimum),
    ("", "Max"): _binary(np.maximum),
    ("", "Clip"): _clip,
    ("", "Cast"): _cast,
    ("", "BitShift"): _bitshift,
    ("", "Identity"): lambda node, x: x,
    ("", "Gather"): lambda node, data, idx: np.take(data, idx.astype(np.int64), axis=_attr(node, "axis", 0)),
    ("", "Reshape"): _reshape,
    ("", "Transpose"): _transpose,
}


class ReferenceInterpreter:
    """Evaluates nodes of an ``ir.Model`` with the reference semantics above."""

    def __init__(self, model: ir.Model):
        self.model = model

    @staticmethod
    def supports(node: ir.Node) -> bool:
        if node.domain == DOMAIN:
            return node.op_type in OPS
        return (node.domain if node.domain != "ai.onnx" else "", node.op_type) in REFERENCE_OPS

    def run_node(self, node: ir.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
        if node.domain == DOMAIN:
            op = OPS.get(node.op_type)
            if op is None:
                raise UnsupportedReferenceOp(f"unknown lowbit op '{node.op_type}' (node '{node.name}')")
            out = op.reference(*inputs, **{k: a.value for k, a in node.attributes.items()})
            return list(out) if isinstance(out, tuple) else [out]
        fn = REFERENCE_OPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if fn is None:
            raise UnsupportedReferenceOp(f"op {node.op_type} (node '{node.name}') is not in the integer reference set",
                                         hint="only integer-region ops and Q/DQ boundaries have reference semantics")
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        return [fn(node, *inputs)]

    def run(self, nodes: Iterable[ir.Node], values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``nodes`` (in graph order) given ``values`` for their non-constant inputs; all values out."""
        env: dict[str, np.ndarray] = dict(values)
        order = {id(n): i for i, n in enumerate(self.model.graph)}
        for node in sorted(nodes, key=lambda n: order[id(n)]):
            ins = []
            for v in node.inputs:
                if v is None:
                    ins.append(None)
                elif v.name in env:
                    ins.append(env[v.name])
                elif v.const_value is not None:
                    ins.append(v.const_value.numpy())
                else:
                    raise LowbitError(f"reference: input '{v.name}' of node '{node.name}' has no value")
            for out, arr in zip(node.outputs, self.run_node(node, ins)):
                env[out.name] = np.asarray(arr)
        return env


def compare_regions_with_ort(model: ir.Model, feeds: list[Mapping[str, np.ndarray]], *, optimize: bool = True):
    """Run every integer region on the reference and compare with ORT, bit for bit.

    ORT runs the whole graph with every region value exposed as an output; the reference runs
    each region from the same entry inputs (the float inputs of its QuantizeLinear entries and
    any integer values produced outside it).  Returns (values compared, list of mismatches).
    """
    from lowbit.ir.integer_check import check_integer_regions

    from lowbit.ir.sessions import make_session, to_proto

    report = check_integer_regions(model)
    region_nodes = [n for r in report.regions for n in r.nodes] + [e for r in report.regions for e in r.entries]
    wanted: list[str] = []
    for n in region_nodes:
        for v in list(n.inputs) + list(n.outputs):
            if v is not None and v.const_value is None and v.name not in wanted:
                wanted.append(v.name)
    proto = to_proto(model)
    have = {o.name for o in proto.graph.output}
    for name in wanted:
        if name not in have:
            proto.graph.output.add(name=name)
    sess = make_session(proto, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    interp = ReferenceInterpreter(model)
    compared, mismatches = 0, []
    for i, feed in enumerate(feeds):
        got = dict(zip(names, sess.run(names, dict(feed))))
        for r in report.regions:
            nodes = list(r.nodes) + list(r.entries)
            produced = {o.name for n in nodes for o in n.outputs}
            given = {v.name: got[v.name] for n in nodes for v in n.inputs
                     if v is not None and v.const_value is None and v.name not in produced}
            env = interp.run(nodes, given)
            for name in produced:
                if name in got:
                    compared += 1
                    if got[name].dtype != env[name].dtype or not np.array_equal(got[name], env[name]):
                        mismatches.append((i, name, int(np.sum(got[name] != env[name]))))
    return compared, mismatches


def compare_graph_with_ort(model: ir.Model, feeds: list[Mapping[str, np.ndarray]]):
    """Reference (``lowbit`` ops by their numpy references) vs ORT (the same graph through lower-lowbit).

    ``model`` still holds its ``lowbit`` nodes.  Walking it in order, the reference computes every
    node it has semantics for from values it computed itself (so an error propagates and is
    caught downstream); the others (shape and mask arithmetic) take ORT's values.  Every integer
    value the reference computed is compared with ORT's, bit for bit.  Returns (compared, mismatches).
    """
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.ir.sessions import make_session, to_proto

    lowered = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    LowerLowbit()(lowered)
    names = [o.name for n in model.graph for o in n.outputs if o.name]
    proto = to_proto(lowered)
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.add(name=name)
    sess = make_session(proto)
    out_names = [o.name for o in sess.get_outputs()]
    interp = ReferenceInterpreter(model)
    compared, mismatches = 0, []
    for i, feed in enumerate(feeds):
        got = dict(zip(out_names, sess.run(out_names, dict(feed))))
        env: dict[str, np.ndarray] = dict(feed)
        for node in model.graph:
            ins = [None if v is None else env.get(v.name, v.const_value.numpy() if v.const_value is not None else None)
                   for v in node.inputs]
            ready = all(a is not None for v, a in zip(node.inputs, ins) if v is not None)
            if not (ready and interp.supports(node)):
                for o in node.outputs:
                    env[o.name] = got[o.name]
                continue
            for o, arr in zip(node.outputs, interp.run_node(node, ins)):
                arr = np.asarray(arr)
                env[o.name] = arr
                if np.issubdtype(arr.dtype, np.integer):
                    compared += 1
                    if got[o.name].dtype != arr.dtype or not np.array_equal(got[o.name], arr):
                        mismatches.append((i, o.name, int(np.sum(got[o.name] != arr))))
    return compared, mismatches
