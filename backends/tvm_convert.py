"""lowbit's converters added to TVM's ONNX importer, for the ops it lacks.

TVM 0.27 looks converters up by op type in ``onnx_frontend._get_convert_map()``;
:func:`lowbit_converters` wraps that function for the duration of one import, so TVM is never
patched globally and importing lowbit never imports TVM.  Converters are registered here by
decorator, one class per op, the way TVM's own are written.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["lowbit_converters", "CONVERTERS"]

logger = logging.getLogger(__name__)

CONVERTERS: dict[str, "type"] = {}


def _register(op_type: str):
    def deco(factory):
        CONVERTERS[op_type] = factory
        return factory

    return deco


def _attr(attrs: dict, name: str):
    v = attrs[name]
    return v.decode() if isinstance(v, bytes) else v


@_register("NBitsMatMul")
def _nbits_matmul():
    """``lowbit.tvm::NBitsMatMul`` (written by tvm_prepare): A @ dequant(W) (+ bias)."""
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from lowbit.backends.tvm_kernels import TILE, gemv_cuda_config, nbits_gemv_cuda, nbits_matmul_cpu, nbits_matmul_te

    class NBitsMatMul(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            a, w, s, z = inputs[:4]
            bias = inputs[4] if len(inputs) > 4 else None
            K, N, bits, bs = (int(attr[k]) for k in ("K", "N", "bits", "block_size"))
            layout = _attr(attr, "layout")
            if a.ty.dtype != "float32" and layout == "tiled":
                raise NotImplementedError(f"NBitsMatMul: activations of {a.ty.dtype} on CPU (float32 only)")
            lead = list(a.ty.shape)[:-1]
            if layout == "lowbit-cpu":  # lowbit's C kernels through a packed function (kernels/tvm_bridge.py)
                from .kernels.tvm_bridge import FUNC

                if a.ty.dtype != "float32":
                    raise NotImplementedError(f"NBitsMatMul: activations of {a.ty.dtype} on lowbit-cpu (float32 only)")
                a2 = bb.normalize(relax.op.reshape(a, (-1, K)))
                M = a2.ty.shape[0]
                y = bb.emit(relax.call_dps_packed(FUNC, [a2, w, s, z], out_ty=relax.TensorType((M, N), "float32")))
                y = relax.op.reshape(y, (*lead, N))
            elif layout == "tiled":
                nt = int(w.ty.shape[0])
                key = (K, nt, bits, bs)
                if key not in cls._funcs or cls._funcs[key][0] is not bb:
                    name = f"lowbit_nbits_matmul_k{K}_t{nt}_b{bits}_g{bs}"
                    func = nbits_matmul_cpu(K, nt, bits, bs).with_attr("global_symbol", name)
                    gv = bb.add_func(func, name)
                    cls._funcs[key] = (bb, gv)
                gv = cls._funcs[key][1]
                a2 = bb.normalize(relax.op.reshape(a, (-1, K)))
                M = a2.ty.shape[0]
                y = bb.emit(relax.call_tir(gv, [a2, w, s, z], relax.TensorType((M, nt * TILE), "float32")))
                if nt * TILE != N:
                    y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))
                y = relax.op.reshape(y, (*lead, N))
            else:
                a2 = bb.normalize(relax.op.reshape(a, (-1, K)))
                M = a2.ty.shape[0]
                cfg = gemv_cuda_config(K, N, bits)
                if cfg is not None and isinstance(M, tirx.IntImm) and int(M) == 1 and a.ty.dtype == s.ty.dtype:
                    key = ("gemv", K, N, bs, str(a.ty.dtype))
                    if key not in cls._funcs or cls._funcs[key][0] is not bb:
                        name = f"lowbit_nbits_gemv_k{K}_n{N}_g{bs}_{a.ty.dtype}"
                        func = nbits_gemv_cuda(K, N, bits, bs, str(a.ty.dtype), *cfg).with_attr("global_symbol", name)
                        cls._funcs[key] = (bb, bb.add_func(func, name))
                    y = bb.emit(relax.call_tir(cls._funcs[key][1], [a2, w, s, z],
                                               relax.TensorType((1, N), str(a.ty.dtype))))
                else:  # dlight schedules this one (GEMV rule for one row, Matmul rule for more)
                    y = bb.emit_te(nbits_matmul_te, a2, w, s, z, K, N, bits, bs, str(a.ty.dtype),
                                   primfunc_name_hint="lowbit_nbits_matmul")
                y = relax.op.reshape(y, (*lead, N))
            if bias is not None:
                y = relax.op.add(y, bias)
            return y

    return NBitsMatMul


@_register("Int8MatMul")
def _int8_matmul():
    """``lowbit.tvm::Int8MatMul(a u8, correction i32, W tiled s8)`` = a @ W - a_zp * colsum(W) in int32."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from tvm.target import Target

    from lowbit.backends.tvm_kernels import TILE, has_vnni, int8_matmul_cpu

    class Int8MatMul(OnnxOpConverter):
        _funcs: dict = {}

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            a, za, w = inputs[:3]
            K, N = int(attr["K"]), int(attr["N"])
            nt = int(w.ty.shape[0])
            if (K, nt) not in cls._funcs or cls._funcs[(K, nt)][0] is not bb:
                target = Target.current(allow_none=True)
                vnni = target is not None and has_vnni(target)
                name = f"lowbit_int8_matmul{'_vnni' if vnni else ''}_k{K}_t{nt}"
                func = int8_matmul_cpu(K, nt, vnni).with_attr("global_symbol", name)
                cls._funcs[(K, nt)] = (bb, bb.add_func(func, name))
            lead = list(a.ty.shape)[:-1]
            a2 = bb.normalize(relax.op.reshape(a, (-1, K)))
            y = bb.emit(relax.call_tir(cls._funcs[(K, nt)][1], [a2, za, w],
                                       relax.TensorType((a2.ty.shape[0], nt * TILE), "int32")))
            if nt * TILE != N:
                y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))
            return relax.op.reshape(y, (*lead, N))

    return Int8MatMul


@_register("Attention")
def _attention():
    """ONNX opset-23 ``Attention`` (TVM 0.27 has none): Q/K/V in [B, S, hidden] (with
    q_num_heads/kv_num_heads) or [B, H, S, d]; grouped KV heads; optional additive or boolean
    mask; ``is_causal``; ``scale``.  Past/present KV, softcap and the extra outputs are refused."""
    import math

    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    class Attention(OnnxOpConverter):
        @classmethod
        def _impl_v23(cls, bb, inputs, attr, params):
            q, k, v = inputs[:3]
            mask = inputs[3] if len(inputs) > 3 else None
            if any(x is not None for x in inputs[4:]) or attr.get("softcap", 0.0) or \
                    attr["tvm_custom"]["num_outputs"] > 1:
                raise NotImplementedError("Attention: past/present KV, softcap and extra outputs are not supported")
            three_d = len(q.ty.shape) == 3
            if three_d:
                hq, hkv = int(attr["q_num_heads"]), int(attr["kv_num_heads"])
                B, S = q.ty.shape[0], q.ty.shape[1]
                q = relax.op.permute_dims(relax.op.reshape(q, (B, S, hq, -1)), [0, 2, 1, 3])
                k = relax.op.permute_dims(relax.op.reshape(k, (B, k.ty.shape[1], hkv, -1)), [0, 2, 1, 3])
                v = relax.op.permute_dims(relax.op.reshape(v, (B, v.ty.shape[1], hkv, -1)), [0, 2, 1, 3])
                q, k, v = (bb.normalize(t) for t in (q, k, v))
            hq, hkv, d = int(q.ty.shape[1]), int(k.ty.shape[1]), int(q.ty.shape[3])
            if hq != hkv:
                k = bb.normalize(relax.op.repeat(k, hq // hkv, axis=1))
                v = bb.normalize(relax.op.repeat(v, hq // hkv, axis=1))
            scale = attr.get("scale", 1.0 / math.sqrt(d))
            dtype = str(q.ty.dtype)
            scores = relax.op.multiply(relax.op.matmul(q, relax.op.permute_dims(k, [0, 1, 3, 2])),
                                       relax.const(scale, dtype))
            scores = bb.normalize(scores)
            sq, skv = scores.ty.shape[2], scores.ty.shape[3]
            if attr.get("is_causal", 0):
                ones = relax.op.ones((sq, skv), "bool")
                keep = relax.op.tril(ones, int(skv) - int(sq) if isinstance(skv, int) or hasattr(skv, "value") else 0)
                scores = relax.op.where(keep, scores, relax.const(float("-inf"), dtype))
            if mask is not None:
                if str(mask.ty.dtype) == "bool":
                    scores = relax.op.where(mask, scores, relax.const(float("-inf"), dtype))
                else:
                    scores = relax.op.add(scores, mask)
            y = relax.op.matmul(relax.op.nn.softmax(scores, axis=-1), v)
            if three_d:
                y = bb.normalize(relax.op.permute_dims(y, [0, 2, 1, 3]))
                y = relax.op.reshape(y, (y.ty.shape[0], y.ty.shape[1], -1))
            return y

    return Attention


@contextlib.contextmanager
def lowbit_converters():
    """Within the block, TVM's ONNX importer also knows lowbit's converters."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from lowbit.backends.tvm_integer import INTEGER_CONVERTERS

    original = onnx_frontend._get_convert_map
    extra = {op: factory() for op, factory in {**CONVERTERS, **INTEGER_CONVERTERS}.items()}

    def patched():
        table = original()
        table.update(extra)
        return table

    onnx_frontend._get_convert_map = patched
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
