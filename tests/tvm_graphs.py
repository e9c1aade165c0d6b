"""Hand-built graph forms for the TVM converter's unit tests and the TVM benchmarks.

These builders make node patterns (static and dynamic W8A8, MatMulNBits, blocked int4
DequantizeLinear) with parameters the passes would not choose (e.g. asymmetric MatMulNBits with
zero points everywhere), so the converter is exercised beyond what one recipe emits.  They are NOT
evidence that lowbit's own output runs on TVM: ``test_tvm_recipes.py`` compiles every recipe with
lowbit and compares TVM with ORT on that very output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10


def _model(nodes, inputs, outputs, inits, opset=21, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = IR_VERSION
    return m


def float_linear(K, N, seed=0, bias=False):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not bias else "mm"], name="linear")]
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="bias"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)


def _quantize_weight(w):
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def static_w8a8_nodes(x, w, name, act_scale, inits, bias=None):
    """x -> Q(u8) -> DQ -> MatMul(DQ(W s8, per-column scale)) (+ bias); returns (nodes, output)."""
    q, ws = _quantize_weight(w)
    inits += [numpy_helper.from_array(q, f"{name}.wq"), numpy_helper.from_array(ws, f"{name}.ws"),
              numpy_helper.from_array(np.array(act_scale, np.float32), f"{name}.as"),
              numpy_helper.from_array(np.array(128, np.uint8), f"{name}.az")]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{name}.as", f"{name}.az"], [f"{name}.xq"], name=f"{name}.q"),
             helper.make_node("DequantizeLinear", [f"{name}.xq", f"{name}.as", f"{name}.az"], [f"{name}.xd"],
                              name=f"{name}.dq"),
             helper.make_node("DequantizeLinear", [f"{name}.wq", f"{name}.ws"], [f"{name}.wd"], name=f"{name}.wdq",
                              axis=1),
             helper.make_node("MatMul", [f"{name}.xd", f"{name}.wd"], [f"{name}.y"], name=name)]
    out = f"{name}.y"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Add", [out, f"{name}.b"], [f"{name}.yb"], name=f"{name}.bias"))
        out = f"{name}.yb"
    return nodes, out


def dynamic_w8a8_nodes(x, w, name, inits):
    """Per-token dynamic u8 (zero point 128) x per-column s8 weight through MatMulInteger."""
    q, ws = _quantize_weight(w)
    c = lambda suffix, v, dt=np.float32: inits.append(numpy_helper.from_array(np.array(v, dt), f"{name}.{suffix}"))
    c("wq", q, np.int8), c("ws", ws), c("axis", [-1], np.int64), c("i127", 127.0), c("eps", 1e-8)
    c("zp", 128.0), c("lo", 0.0), c("hi", 255.0), c("azp", 128, np.uint8)
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{name}.{out}"], name=f"{name}.{out}", **kw)
    nodes = [n("Abs", [x], "abs"), n("ReduceMax", [f"{name}.abs", f"{name}.axis"], "amax", keepdims=1),
             n("Max", [f"{name}.amax", f"{name}.eps"], "amax_eps"),
             n("Div", [f"{name}.amax_eps", f"{name}.i127"], "rs"), n("Div", [x, f"{name}.rs"], "xs"),
             n("Round", [f"{name}.xs"], "xr"), n("Add", [f"{name}.xr", f"{name}.zp"], "xz"),
             n("Clip", [f"{name}.xz", f"{name}.lo", f"{name}.hi"], "xc"),
             n("Cast", [f"{name}.xc"], "xu8", to=TensorProto.UINT8),
             n("MatMulInteger", [f"{name}.xu8", f"{name}.wq", f"{name}.azp"], "acc"),
             n("Cast", [f"{name}.acc"], "accf", to=TensorProto.FLOAT),
             n("Mul", [f"{name}.accf", f"{name}.rs"], "yrow"), n("Mul", [f"{name}.yrow", f"{name}.ws"], "y")]
    return nodes, f"{name}.y"


def blocked_int4_nodes(x, w, name, inits, block=32, zero_point=True):
    """MatMul(x, DequantizeLinear(W int4 [K, N], scale [K/bs, N], zp int4, block_size=bs, axis=0))."""
    K, N = w.shape
    wb = w.reshape(K // block, block, N)
    lo, hi = wb.min(axis=1), wb.max(axis=1)
    if zero_point:
        scale = np.maximum(hi - lo, 1e-8) / 15
        zp = np.clip(np.round(-8 - lo / scale), -8, 7)
    else:
        scale, zp = np.maximum(np.abs(lo), np.abs(hi)) / 7, np.zeros_like(lo)
    q = np.clip(np.round(wb / scale[:, None]) + zp[:, None], -8, 7).reshape(K, N)
    inits.append(helper.make_tensor(f"{name}.wq", TensorProto.INT4, [K, N], q.astype(np.int8).flatten().tolist()))
    inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}.ws"))
    ins = [f"{name}.wq", f"{name}.ws"]
    if zero_point:
        inits.append(helper.make_tensor(f"{name}.wz", TensorProto.INT4, list(zp.shape), zp.astype(np.int8).flatten().tolist()))
        ins.append(f"{name}.wz")
    nodes = [helper.make_node("DequantizeLinear", ins, [f"{name}.wd"], name=f"{name}.wdq", axis=0, block_size=block),
             helper.make_node("MatMul", [x, f"{name}.wd"], [f"{name}.y"], name=name)]
    return nodes, f"{name}.y"


def single_linear(form: str, K=64, N=96, seed=0, **kw):
    """One linear layer in ``form`` ("static", "dynamic", "int4"); input x [M, K] float."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    inits: list = []
    if form == "static":
        nodes, out = static_w8a8_nodes("x", w, "lin", kw.get("act_scale", 0.03), inits,
                                       bias=rng.standard_normal(N) if kw.get("bias") else None)
    elif form == "dynamic":
        nodes, out = dynamic_w8a8_nodes("x", w, "lin", inits)
    elif form == "int4":
        nodes, out = blocked_int4_nodes("x", w, "lin", inits, kw.get("block", 32), kw.get("zero_point", True))
    else:
        raise ValueError(form)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])]
    if form == "dynamic":  # also expose the int32 accumulator: integer outputs must match bit for bit
        nodes.append(helper.make_node("Identity", ["lin.acc"], ["acc"], name="acc_out"))
        outputs.append(helper.make_tensor_value_info("acc", TensorProto.INT32, ["M", N]))
    if form == "static":
        nodes.append(helper.make_node("Identity", ["lin.xq"], ["xq"], name="xq_out"))
        outputs.append(helper.make_tensor_value_info("xq", TensorProto.UINT8, ["M", K]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outputs, inits)


def quantize_all_linears(model: onnx.ModelProto, form: str, act_scale=0.05, block=32) -> onnx.ModelProto:
    """Rewrite every MatMul with a 2-D float initializer weight into ``form`` (a copy)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    new_nodes, new_inits = [], []
    for node in m.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        if form == "static":
            nodes, out = static_w8a8_nodes(node.input[0], arr, node.name, act_scale, new_inits)
        elif form == "dynamic":
            nodes, out = dynamic_w8a8_nodes(node.input[0], arr, node.name, new_inits)
        else:
            nodes, out = blocked_int4_nodes(node.input[0], arr, node.name, new_inits, block)
        nodes.append(helper.make_node("Identity", [out], [node.output[0]], name=f"{node.name}.out"))
        new_nodes += nodes
    used = {i for n in new_nodes for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + new_inits)
    m.ir_version = IR_VERSION
    return m


def matmulnbits(model: onnx.ModelProto, bits=4, block=32, symmetric=False) -> onnx.ModelProto:
    """ORT's own MatMulNBitsQuantizer on a float graph."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    q = MatMulNBitsQuantizer(m, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=0)
    q.process()
    out = q.model.model
    out.ir_version = IR_VERSION
    return out
