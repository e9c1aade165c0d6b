"""TVM lowering of lowbit's integer ops: the int8 GEMM with its requantize fused, and converters
for ``lowbit::Requantize``, ``Lookup``, ``IntNorm`` and ``IntSoftmax``.

Two steps, both run by ``lower-tvm`` (:mod:`lowbit.backends.tvm_lower`):

* :func:`fuse_integer_gemms` (on the ONNX IR, after ``prepare_for_tvm`` tiled the int8 weights)::

      Int8MatMul(a, C, W) [→ Add(·, offset int32)] → Requantize(·, b, c, zp)
        ≡ Int8MatMulRequantize(a, C − offset, W, b, c, zp)

  exact because int32 addition wraps the same in either order (the kernel starts its accumulator
  at −C), and b, c, zp are per-channel constants padded to the 64-column tiles.
* converters (:data:`INTEGER_CONVERTERS`, merged by ``tvm_convert.lowbit_converters``): the fused GEMM and
  the norm/softmax call the TIR kernels of :mod:`lowbit.backends.tvm_integer_kernels`;
  ``Requantize`` and ``Lookup`` become Relax element-wise ops (int64 multiply, arithmetic shift,
  clip; a gather from the flat table) that TVM fuses with their neighbours.

Every kernel computes the op's numpy reference bit for bit (tested on the real models).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.backends.tvm_integer_attention import fuse_integer_attention
from lowbit.backends.tvm_integer_kernels import TILE
from lowbit.backends.tvm_integer_norm import fuse_integer_norms
from lowbit.backends.tvm_prepare import NBITS_DOMAIN

__all__ = ["INTEGER_CONVERTERS", "INTEGER_OPS", "fold_static_shapes", "fuse_integer_gemms"]

logger = logging.getLogger(__name__)


INTEGER_OPS = ("Requantize", "Lookup", "IntNorm", "IntSoftmax")
INTEGER_CONVERTERS: dict[str, "type"] = {}  # op type -> converter factory (merged by tvm_convert.lowbit_converters)


def fold_static_shapes(model: ir.Model, shape_dict: dict[str, list[int]]) -> int:
    """Pin the inputs to ``shape_dict`` and fold the shape arithmetic (Shape → Range → mask) into constants.

    Only for graphs holding lowbit integer ops (one TVM artifact per static shape): TVM's importer
    keeps Range lengths symbolic, and the attention mask built from them then fails VM shape
    lowering; shapes read off lowbit ops' results would be run-time shapes.  ONNX shape inference
    cannot see through lowbit ops, so every value's shape and type are taken from one ORT run of
    the lowered graph (zeros of the static shapes); then onnxscript's folder evaluates standard
    ops on constants (lowbit ops are never evaluated).  Returns the number of nodes removed.
    """
    if not any(n.domain == "lowbit" and n.op_type in INTEGER_OPS for n in model.graph):
        return 0
    import onnxscript.optimizer
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.ir.sessions import make_session, to_proto

    for v in model.graph.inputs:
        if v.name in shape_dict:
            v.shape = ir.Shape(shape_dict[v.name])
    lowered = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    LowerLowbit()(lowered)
    proto = to_proto(lowered)
    values = {o.name: o for n in model.graph for o in n.outputs if o.name}
    have = {o.name for o in proto.graph.output}
    lowered_names = {o.name for n in lowered.graph for o in n.outputs}
    names = [k for k in values if k in lowered_names]
    for name in names:
        if name not in have:
            proto.graph.output.add(name=name)
    feed = {v.name: np.zeros(shape_dict[v.name], v.dtype.numpy()) for v in model.graph.inputs}
    sess = make_session(proto, optimize=False)
    out_names = [o.name for o in sess.get_outputs()]
    for name, arr in zip(out_names, sess.run(out_names, feed)):
        if name in values:
            values[name].shape = ir.Shape(list(arr.shape))
            values[name].dtype = ir.DataType.from_numpy(arr.dtype)
    before = len(model.graph)
    onnxscript.optimizer.fold_constants(model)
    RemoveUnusedNodesPass()(model)
    return before - len(model.graph)


def _sole_use(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value in graph.outputs:
        return None
    return uses[0][0]


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _per_channel(arr: np.ndarray, n: int, pad: int, fill) -> np.ndarray:
    out = np.broadcast_to(arr.reshape(-1) if arr.size > 1 else arr.reshape(()), (n,))
    return np.concatenate([out, np.full(pad - n, fill, arr.dtype)])


def _initializer(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arr)))
    v.shape, v.type = ir.Shape(arr.shape), ir.TensorType(ir.DataType.from_numpy(arr.dtype))
    graph.register_initializer(v)
    return v


def fuse_integer_gemms(model: ir.Model) -> int:
    """Fold each Requantize (and the int32 offset before it) into the Int8MatMul it reads; returns the count."""
    graph, fused = model.graph, 0
    for node in list(graph):
        if node.domain != NBITS_DOMAIN or node.op_type != "Int8MatMul":
            continue
        chain, nxt = [node], _sole_use(node.outputs[0], graph)
        offset = np.zeros((), np.int32)
        if nxt is not None and nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx"):
            k = _const(nxt.inputs[1]) if nxt.inputs[0] is node.outputs[0] else _const(nxt.inputs[0])
            if k is None or k.dtype != np.int32 or k.ndim > 1:
                continue
            offset = k
            chain.append(nxt)
            nxt = _sole_use(nxt.outputs[0], graph)
        if nxt is None or nxt.domain != "lowbit" or nxt.op_type != "Requantize":
            continue
        b, c, zp = (_const(v) for v in nxt.inputs[1:4])
        if b is None or c is None or zp is None or any(a.size > 1 and a.ndim != 1 for a in (b, c, zp)):
            continue
        N = node.attributes["N"].as_int()
        corr = _const(node.inputs[1])
        nt = corr.shape[0]
        pad = nt * TILE
        off = _per_channel(offset.astype(np.int32), N, pad, np.int32(0))
        with np.errstate(over="ignore"):
            corr2 = (corr.reshape(-1) - off).astype(np.int32).reshape(nt, TILE)
        base = nxt.name or node.name
        ins = [node.inputs[0], _initializer(graph, f"{base}.tvm_correction", corr2), node.inputs[2],
               _initializer(graph, f"{base}.tvm_b", _per_channel(b.astype(np.int64), N, pad, np.int64(1))),
               _initializer(graph, f"{base}.tvm_c", _per_channel(c.astype(np.int64), N, pad, np.int64(1))),
               _initializer(graph, f"{base}.tvm_zp", _per_channel(zp, N, pad, zp.reshape(-1)[0]))]
        new = ir.Node(NBITS_DOMAIN, "Int8MatMulRequantize", ins, name=f"{base}.tvm",
                      attributes=[ir.AttrInt64("K", node.attributes["K"].as_int()), ir.AttrInt64("N", N)])
        out = nxt.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = out.shape, out.type
        graph.insert_before(nxt, new)
        is_output = out in graph.outputs
        ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
        if is_output:
            name, out.name = out.name, None
            new.outputs[0].name = name
        for n in reversed(chain + [nxt]):
            graph.remove(n, safe=True)
        fused += 1
    logger.debug("fuse_integer_gemms: %d requantizes fused into their GEMMs", fused)
    fuse_integer_attention(model)  # Q·Kᵀ → softmax → P·V chains: one kernel each (tvm_integer_attention.py)
    fuse_integer_norms(model)  # residual add → IntNorm → Requantize: one kernel each (tvm_integer_norm.py)
    return fused


def _rows(bb, x, C: int):
    """x as [rows, C] for a kernel: the 2-D tensor itself when x is a reshape of one (a kernel's output
    reshaped back to the graph's shape), so that no reshape pair is left for TVM to copy."""
    import tvm
    from tvm import relax, tirx

    inner = bb.lookup_binding(x) if isinstance(x, relax.Var) else x
    if isinstance(inner, relax.Call) and inner.op.same_as(tvm.ir.Op.get("relax.reshape")):
        src = inner.args[0]
        dims = list(src.ty.shape) if getattr(src.ty, "shape", None) is not None else None
        if dims is not None and len(dims) == 2 and isinstance(dims[1], tirx.IntImm) and int(dims[1]) == C:
            return src
    return bb.normalize(relax.op.reshape(x, (-1, C)))


def _cached(cls, bb, key, make):
    if key not in cls._funcs or cls._funcs[key][0] is not bb:
        name = "lowbit_" + "_".join(str(k) for k in key)
        cls._funcs[key] = (bb, bb.add_func(make().with_attr("global_symbol", name), name))
    return cls._funcs[key][1]


def _np(expr, what: str) -> np.ndarray:
    import tvm

    if not isinstance(expr, tvm.ir.GenericConst):
        raise NotImplementedError(f"{what} must be a constant")
    return expr.value.numpy()


def _register(op_type: str):
    def deco(factory):
        INTEGER_CONVERTERS[op_type] = factory
        return factory

    return deco


@_register("Int8MatMulRequantize")
def _int8_matmul_requantize():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
    from tvm.target import Target

    from lowbit.backends.tvm_integer_kernels import int8_matmul_requantize_cpu
    from lowbit.backends.tvm_kernels import has_vnni

    class Int8MatMulRequantize(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            a, corr, w, b, c, zp = inputs[:6]
            K, N = int(attr["K"]), int(attr["N"])
            nt, dt = int(w.ty.shape[0]), str(zp.ty.dtype)
            target = Target.current(allow_none=True)
            vnni = target is not None and has_vnni(target)
            gv = _cached(cls, bb, ("int8_matmul_requantize", "vnni" if vnni else "plain", f"k{K}", f"t{nt}", dt),
                         lambda: int8_matmul_requantize_cpu(K, nt, dt, vnni))
            lead = list(a.ty.shape)[:-1]
            a2 = _rows(bb, a, K)
            y = bb.emit(relax.call_tir(gv, [a2, corr, w, b, c, zp], relax.TensorType((a2.ty.shape[0], nt * TILE), dt)))
            if nt * TILE != N:
                y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))
            return relax.op.reshape(y, (*lead, N))

    return Int8MatMulRequantize


@_register("IntAttention")
def _int_attention():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
    from tvm.target import Target

    from lowbit.backends.tvm_integer_attention import int_attention_cpu
    from lowbit.backends.tvm_kernels import has_vnni

    class IntAttention(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            q, kt, v, keep, table, prm, rq = inputs[:7]
            lead = [int(d) for d in list(q.ty.shape)[:-2]]
            M, D, L = int(q.ty.shape[-2]), int(q.ty.shape[-1]), int(kt.ty.shape[-1])
            bh = int(np.prod(lead))
            ld, od = (a.decode() if isinstance(a, bytes) else str(a) for a in (attr["logit_dtype"], attr["out_dtype"]))
            target = Target.current(allow_none=True)
            vnni = target is not None and has_vnni(target) and L % 16 == 0 and D % 16 == 0
            H = int(rq.ty.shape[1])
            gv = _cached(cls, bb, ("int_attention", "vnni" if vnni else "plain", f"h{H}", f"m{M}", f"l{L}", f"d{D}", ld, od),
                         lambda: int_attention_cpu(H, M, L, D, ld, od, vnni))
            if len(keep.ty.shape) == len(lead) + 2:  # Range-built mask dims may be symbolic: pin them (checked at run time)
                from tvm import tirx

                dims = [k if isinstance(k, tirx.IntImm) else d for k, d in zip(keep.ty.shape, (*lead, M, L))]
                keep = bb.match_cast(keep, relax.TensorType(dims, "bool"))
            keep = bb.normalize(relax.op.broadcast_to(keep, (*lead, M, L)))
            args = [bb.normalize(relax.op.reshape(x, (bh, *s))) for x, s in
                    ((q, (M, D)), (kt, (D, L)), (v, (L, D)), (keep, (M, L)))]
            y = bb.emit(relax.call_tir(gv, [*args, table, prm, rq], relax.TensorType((bh, M, D), od)))
            return relax.op.reshape(y, (*lead, M, D))

    return IntAttention


@_register("Requantize")
def _requantize():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from lowbit.ops.integer_ops import QRANGE

    class Requantize(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            acc, b, c, zp = inputs[:4]
            b, c, zpv = (_np(x, f"Requantize {n}") for x, n in ((b, "b"), (c, "c"), (zp, "zero_point")))
            lo, hi = QRANGE[zpv.dtype]
            c = c.astype(np.int64)
            t = relax.op.add(relax.op.multiply(relax.op.astype(acc, "int64"), relax.const(b.astype(np.int64), "int64")),
                             relax.const(np.left_shift(np.int64(1), c - 1), "int64"))
            r = relax.op.add(relax.op.right_shift(t, relax.const(c, "int64")), relax.const(zpv.astype(np.int64), "int64"))
            r = relax.op.minimum(relax.op.maximum(r, relax.const(lo, "int64")), relax.const(hi, "int64"))
            return relax.op.astype(r, str(zpv.dtype))

    return Requantize


@_register("Lookup")
def _lookup():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from lowbit.backends.tvm_integer_kernels import lookup_cpu

    class Lookup(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, table = inputs[:2]
            shape = [int(d) for d in table.ty.shape]
            n = shape[0] if len(shape) == 2 else 1
            N, xd, td = int(x.ty.shape[-1]), str(x.ty.dtype), str(table.ty.dtype)
            gv = _cached(cls, bb, ("lookup", f"n{N}", f"t{n}", xd, td), lambda: lookup_cpu(N, n, xd, td))
            lead = list(x.ty.shape)[:-1]
            x2 = _rows(bb, x, N)
            flat = bb.normalize(relax.op.reshape(table, (n * 256,)))
            y = bb.emit(relax.call_tir(gv, [x2, flat], relax.TensorType((x2.ty.shape[0], N), td)))
            return relax.op.reshape(y, (*lead, N))

    return Lookup


def _int_norm_converter(fused: bool):
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from lowbit.backends.tvm_integer_norm import int_norm_cpu

    class IntNorm(OnnxOpConverter):
        """lowbit.IntNorm, or lowbit.tvm.IntNormFused (x, x2, zx, g, bias, zp, rb, rc, rz) -> (y, y2)."""
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if fused:
                x, x2, zx, g, bias, zp, rb, rc, rz = inputs[:9]
            else:
                (x, zx, g, bias, zp), x2, rb, rc, rz = inputs[:5], None, None, None, None
            a = {"rms": 0, "frac_bits": 20, "shift": 36, "n_min": 1, **{k: int(attr[k]) for k in
                                                                          ("rms", "frac_bits", "shift", "n_min") if k in attr}}
            C = int(x.ty.shape[-1])
            xd, x2d = str(x.ty.dtype), None if x2 is None else str(x2.ty.dtype)
            zpv = _np(zp, "IntNorm zero_point")
            od = str(zpv.dtype)
            rqd = str(rz.ty.dtype) if fused and int(attr.get("requantize", 0)) else None
            gv = _cached(cls, bb, ("int_norm", f"c{C}", xd, x2d or "", od, rqd or "", *(f"{k}{v}" for k, v in a.items())),
                         lambda: int_norm_cpu(C, xd, od, **a, x2_dtype=x2d, rq_dtype=rqd))
            zx1 = relax.const(_np(zx, "IntNorm x_zero_point").astype(np.int64).reshape(1), "int64")
            zpc = relax.const(np.ascontiguousarray(np.broadcast_to(zpv.reshape(-1) if zpv.size > 1 else zpv, (C,))), od)
            lead = list(x.ty.shape)[:-1]
            x_ = _rows(bb, x, C)
            rows = x_.ty.shape[0]
            x2_ = relax.const(np.zeros((1, C), xd), xd) if x2 is None else _rows(bb, x2, C)
            if rqd is None:
                rb, rc, rz = (relax.const(np.zeros(C, d), d) for d in ("int64", "int64", od))
            y2d = rqd or od
            out = bb.emit(relax.call_tir(gv, [x_, x2_, zx1, g, bias, zpc, rb, rc, rz],
                                         [relax.TensorType((rows, C), od), relax.TensorType((rows if rqd else 1, C), y2d)]))
            y = relax.op.reshape(bb.emit(relax.TupleGetItem(out, 0)), (*lead, C))
            if not fused:
                return y
            y2 = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(out, 1)), (*lead, C))) if rqd else bb.emit(
                relax.TupleGetItem(out, 1))
            return relax.Tuple([bb.emit(y), y2])

    return IntNorm


INTEGER_CONVERTERS["IntNorm"] = lambda: _int_norm_converter(False)
INTEGER_CONVERTERS["IntNormFused"] = lambda: _int_norm_converter(True)


@_register("IntSoftmax")
def _int_softmax():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from lowbit.backends.tvm_integer_kernels import int_softmax_cpu

    class IntSoftmax(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, table = inputs[:2]
            keep = inputs[2] if len(inputs) > 2 else None
            L, xd = int(x.ty.shape[-1]), str(x.ty.dtype)
            gv = _cached(cls, bb, ("int_softmax", f"l{L}", xd), lambda: int_softmax_cpu(L, xd))
            shape = x.ty.shape
            if keep is not None and len(keep.ty.shape) == len(shape):
                # the mask's dims often come out of Range as symbolic: pin them to x's (checked at run time)
                from tvm import tirx

                dims = [k if isinstance(k, tirx.IntImm) else d for k, d in zip(keep.ty.shape, shape)]
                keep = bb.match_cast(keep, relax.TensorType(dims, "bool"))
            keep = bb.normalize(relax.op.ones(shape, "bool") if keep is None else relax.op.broadcast_to(keep, shape))
            x2 = bb.normalize(relax.op.reshape(x, (-1, L)))
            k2 = bb.normalize(relax.op.reshape(keep, (-1, L)))
            y = bb.emit(relax.call_tir(gv, [x2, table, k2], relax.TensorType((x2.ty.shape[0], L), "uint8")))
            return relax.op.reshape(y, shape)

    return IntSoftmax


@_register("MatMulInteger")
def _matmul_integer():
    """Both operands computed at run time (attention): lowbit's batched kernel; otherwise TVM's converter."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import MatMulInteger as TvmMatMulInteger

    from lowbit.backends.tvm_integer_kernels import int_batch_matmul_cpu

    class MatMulInteger(TvmMatMulInteger):
        _funcs: dict = {}

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            a, b = inputs[:2]
            zps = [inputs[i] if len(inputs) > i else None for i in (2, 3)]
            static = all(x.ty.shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in x.ty.shape)
                         for x in (a, b))
            scalar = all(z is None or (isinstance(z, tvm.ir.GenericConst) and z.value.numpy().size == 1) for z in zps)
            if (isinstance(b, tvm.ir.GenericConst) or not static or not scalar or len(a.ty.shape) < 3
                    or len(a.ty.shape) != len(b.ty.shape)
                    or [int(d) for d in list(a.ty.shape)[:-2]] != [int(d) for d in list(b.ty.shape)[:-2]]):
                return super()._impl_v10(bb, inputs, attr, params)
            lead = [int(d) for d in list(a.ty.shape)[:-2]]
            M, K, N = int(a.ty.shape[-2]), int(a.ty.shape[-1]), int(b.ty.shape[-1])
            batch = int(np.prod(lead))
            ad, bd = str(a.ty.dtype), str(b.ty.dtype)
            gv = _cached(cls, bb, ("int_batch_matmul", f"b{batch}", f"m{M}", f"k{K}", f"n{N}", ad, bd),
                         lambda: int_batch_matmul_cpu(batch, M, K, N, ad, bd))
            za, zb = (relax.const(np.zeros(1, d) if z is None else z.value.numpy().astype(d).reshape(1), d)
                      for z, d in zip(zps, (ad, bd)))
            a3 = bb.normalize(relax.op.reshape(a, (batch, M, K)))
            b3 = bb.normalize(relax.op.reshape(b, (batch, K, N)))
            y = bb.emit(relax.call_tir(gv, [a3, b3, za, zb], relax.TensorType((batch, M, N), "int32")))
            return relax.op.reshape(y, (*lead, M, N))

    return MatMulInteger
