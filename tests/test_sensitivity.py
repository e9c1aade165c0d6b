"""RTN quantizer, storage byte counts, and both sensitivity estimators (cheap and measured)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.quant.stats import act_stats
from lowbit.errors import CalibrationError
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.rtn import dequantize_rtn, fake_quant, pack, quantize_rtn, storage_bytes
from lowbit.ir.sessions import make_session, to_proto
from lowbit.mixed.sensitivity import SensitivityCache, cheap_per_column, measured_sensitivity
from rtn_reference import rtn_reference

CFG = LlamaConfig(dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)


def tiny_model():
    return build_llama(CFG, random_llama_weights(CFG, seed=3))


def feeds(n=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, CFG.vocab_size, (1, t)).astype(np.int64)} for _ in range(n)]


def calibrated(model, fs):
    ctx = CompileContext(calibration=fs, show_progress=False)
    return PassManager.from_pipeline("calibrate{hessian=true}", ctx).run(model)


@pytest.mark.parametrize("k,n,group", [(64, 10, 32), (172, 7, 32), (172, 7, 64), (40, 3, 0), (48, 5, 128)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_buffers_have_the_counted_bytes(k, n, group, bits):
    w = np.random.default_rng(k + n + bits).standard_normal((k, n)).astype(np.float32)
    arrays = pack(w, bits, group)
    assert sum(a.nbytes for a in arrays.values()) == storage_bytes(k, n, bits, group)
    nb = -(-k // group) if 0 < group < k else 1
    if bits == 3:  # lowbit.MatMul3Bit's inputs: its reference computes exactly the fake-quantized weight
        from lowbit.ops.float_ops import matmul3bit_reference

        assert arrays["B"].shape == (n, -(-k // 8) * 3) and arrays["scales"].shape == arrays["zero_points"].shape == (n, nb)
        block = group if 0 < group < k else k
        eye = np.eye(k, dtype=np.float32)
        np.testing.assert_array_equal(matmul3bit_reference(eye, arrays["B"], arrays["scales"], arrays["zero_points"], block),
                                      rtn_reference(w, 3, group))
        return
    assert arrays["B"].shape[:2] == (n, nb) and arrays["scales"].shape == (n * nb,)


@pytest.mark.parametrize("k,n", [(64, 10), (172, 7), (40, 3)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_fake_quant_is_the_rtn_formula(k, n, bits, group):
    """fake_quant/quantize_rtn against the loop-by-loop reference, incl. all-positive and all-zero columns."""
    w = np.random.default_rng(k * bits + group).standard_normal((k, n)).astype(np.float32)
    w[:, 0], w[:, 1], w[:, 2] = np.abs(w[:, 0]) + 0.1, 0.0, -np.abs(w[:, 2])
    want = rtn_reference(w, bits, group)
    np.testing.assert_array_equal(fake_quant(w, bits, group), want)
    np.testing.assert_array_equal(dequantize_rtn(*quantize_rtn(w, bits, group), k), want)


def test_rtn_reproduces_values_on_its_grid_and_error_falls_with_bits():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (64, 6)).astype(np.float32)
    q[0], q[1], q[32], q[33] = 0, 15, 0, 15  # every group spans the full grid
    w = (q - 7) * 0.25
    assert np.array_equal(fake_quant(w, 4, 32), w)
    x = rng.standard_normal((128, 16)).astype(np.float32)
    errs = [np.abs(fake_quant(x, b, 32) - x).max() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.02
    qq, scale, zp = quantize_rtn(x, 3, 32)
    assert qq.max() <= 7 and np.allclose(dequantize_rtn(qq, scale, zp, 128), fake_quant(x, 3, 32))


def test_cheap_estimator_is_hessian_diagonal_weighted_perturbation():
    model = calibrated(tiny_model(), feeds())
    lin = find_linears(model.graph)[0]
    st = act_stats(lin.input)
    w = lin.weight.const_value.numpy()
    dw = rtn_reference(w, 3, 32).astype(np.float64) - w
    want = (np.diag(st.xtx)[:, None] / st.count * dw**2).sum(axis=0)
    np.testing.assert_allclose(cheap_per_column(lin, 3, 32), want, rtol=1e-12)
    values = [cheap_per_column(lin, b, 32).sum() for b in (2, 3, 4, 8, 16)]
    assert values == sorted(values, reverse=True) and values[-1] == 0


def test_cheap_estimator_needs_hessian_statistics():
    lin = find_linears(tiny_model().graph)[0]
    with pytest.raises(CalibrationError, match="calibrate"):
        cheap_per_column(lin, 4, 32)


def _nll_with(model, name, w_new, fs):
    """Independent path: a copy of the model with the weight replaced, one session, plain NLL."""
    from lowbit.runtime.llm import log_softmax

    proto = to_proto(model)
    for t in proto.graph.initializer:
        if t.name == name:
            import onnx

            t.CopyFrom(onnx.numpy_helper.from_array(w_new.astype(np.float32), name))
    sess = make_session(proto)
    total = count = 0
    for f in fs:
        lp = log_softmax(sess.run(None, f)[0][:, :-1])
        tgt = f["tokens"][:, 1:]
        total -= np.take_along_axis(lp, tgt[..., None], -1).sum()
        count += tgt.size
    return total / count


def test_measured_is_the_loss_change_of_the_layer_alone_and_is_cached(tmp_path):
    model = tiny_model()
    fs = feeds(n=3, t=10) + feeds(n=2, t=7, seed=1)  # unequal lengths
    lins = find_linears(model.graph)
    lin = lins[2]
    w = lin.weight.const_value.numpy()
    got = measured_sensitivity(model, [(lin, 2, 32), (lin, 16, 0)], fs, cache_dir=tmp_path, progress=False)
    want = _nll_with(model, lin.weight.name, rtn_reference(w, 2, 32), fs) - _nll_with(model, lin.weight.name, w, fs)
    assert got[(lin.name, 2, 32)] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert got[(lin.name, 16, 0)] == 0.0
    (path,) = (tmp_path / "sensitivity").glob("*.json")
    data = json.loads(path.read_text())
    assert {f"{lin.name}|2|32|nll", f"{lin.name}|2|32|kl"} <= set(data)
    assert data[f"{lin.name}|2|32|kl"] > 0
    data[f"{lin.name}|2|32|nll"] = 123.0  # the next call must read the cache, not recompute
    path.write_text(json.dumps(data))
    again = measured_sensitivity(model, [(lin, 2, 32)], fs, cache_dir=tmp_path, progress=False)
    assert again[(lin.name, 2, 32)] == 123.0
    other = measured_sensitivity(model, [(lin, 2, 32)], feeds(n=2, seed=5), cache_dir=tmp_path, progress=False)
    assert other[(lin.name, 2, 32)] != 123.0  # other calibration data: other key


def test_cache_key_changes_with_the_weights(tmp_path):
    m1, m2 = tiny_model(), build_llama(CFG, random_llama_weights(CFG, seed=4))
    from lowbit.mixed.sensitivity import model_fingerprint

    assert model_fingerprint(m1) != model_fingerprint(m2)
    assert model_fingerprint(m1) == model_fingerprint(tiny_model())
    c = SensitivityCache(tmp_path, model_fingerprint(m1), "f")
    c.put(1.5, "a", 2, 32, "nll")
    c.save()
    assert SensitivityCache(tmp_path, model_fingerprint(m1), "f").get("a", 2, 32, "nll") == 1.5
    assert SensitivityCache(tmp_path, model_fingerprint(m2), "f").get("a", 2, 32, "nll") is None
    assert isinstance(m1, ir.Model)


def test_measured_for_an_encoder_is_mean_one_minus_cosine(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 24)).astype(np.float32), rng.standard_normal((24, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="l1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="l2")], "enc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 8])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    fs = [{"x": rng.standard_normal((2, 5, 16)).astype(np.float32)} for _ in range(2)]
    lin = next(x for x in find_linears(model.graph) if x.weight.name == "w1")
    got = measured_sensitivity(model, [(lin, 2, 0)], fs, kind="encoder", cache_dir=tmp_path, progress=False)
    cos = []
    for f in fs:
        ref = np.maximum(f["x"] @ w1, 0) @ w2
        out = np.maximum(f["x"] @ rtn_reference(w1, 2, 0), 0) @ w2
        cos.append((ref * out).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(out, axis=-1))
    assert got[(lin.name, 2, 0)] == pytest.approx(float(np.mean(1 - np.concatenate(cos, axis=None))), rel=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (2, 32), (8, 32), (8, 64), (2, 16)])
def test_packed_arrays_equal_ort_matmulnbits_quantizer_output(bits, group):
    """Our RTN and storage layout are ORT's: same B, scales and zero points, byte for byte."""
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    cfg = LlamaConfig(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)
    model = build_llama(cfg, random_llama_weights(cfg))
    q = MatMulNBitsQuantizer(to_proto(model), bits=bits, block_size=group, is_symmetric=False, accuracy_level=0)
    q.process()
    proto = q.model.model
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    lins = find_linears(model.graph)
    assert len(nodes) == len(lins)
    for lin in lins:
        node = nodes[f"{lin.node.name}_Q{bits}"]
        ours = pack(lin.weight.const_value.numpy(), bits, group)
        for mine, name in zip(ours.values(), node.input[1:]):
            np.testing.assert_array_equal(mine.reshape(-1), inits[name].reshape(-1), err_msg=f"{lin.name} {name}")
        assert sum(a.nbytes for a in ours.values()) == storage_bytes(*lin.shape, bits, group)


def test_gptq_quantizer_simulates_the_weights_quantize_weights_writes(tmp_path):
    """quantizer=gptq: the probe's weight is the one quantize-weights{method=gptq,symmetric=false} computes."""
    from lowbit.mixed.sensitivity import simulated_weight

    fs = feeds(n=3, t=10)
    model = calibrated(tiny_model(), fs)
    lin = find_linears(model.graph)[4]
    w = lin.weight.const_value.numpy()
    gptq_w = simulated_weight(lin, 3, 32, "gptq")
    assert not np.array_equal(gptq_w, rtn_reference(w, 3, 32))  # GPTQ, not RTN
    got = measured_sensitivity(model, [(lin, 3, 32)], fs, cache_dir=tmp_path, quantizer="gptq", progress=False)
    rtn = measured_sensitivity(model, [(lin, 3, 32)], fs, cache_dir=tmp_path, progress=False)
    want = _nll_with(model, lin.weight.name, gptq_w, fs) - _nll_with(model, lin.weight.name, w, fs)
    assert got[(lin.name, 3, 32)] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert got[(lin.name, 3, 32)] != rtn[(lin.name, 3, 32)]  # cached apart
    # the pass's own GPTQ computes the same weight (its DequantizeLinear is the materialised Ŵ)
    ctx = CompileContext(calibration=fs, show_progress=False, properties={"calibrated", "calibrated-hessian"})
    lin.node.metadata_props.update({"lowbit.bits": "3", "lowbit.group": "32"})
    PassManager.from_pipeline("quantize-weights{method=gptq,symmetric=false,exclude=-none-}", ctx).run(model)
    from lowbit.ops.float_ops import matmul3bit_reference

    (node,) = [n for n in model.graph if n.op_type == "MatMul3Bit"]  # the only 3-bit layer
    packed, scales, zps = (v.const_value.numpy() for v in node.inputs[1:])
    written = matmul3bit_reference(np.eye(w.shape[0], dtype=np.float32), packed, scales, zps,
                                   node.attributes["block_size"].as_int())
    np.testing.assert_allclose(written, gptq_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [48, 64, 100])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_group_covering_the_column_is_per_channel(k, bits):
    """``group ≥ K`` means one group per column (module doc): the same buffers, bytes and values as group=0,
    whatever K (a power of two or not: MatMulNBits' block is the next power of two ≥ K)."""
    w = np.random.default_rng(k + bits).standard_normal((k, 5)).astype(np.float32)
    per_channel = pack(w, bits, 0)
    for group in (k, k + 1, 4 * k):
        for (name, a), b in zip(pack(w, bits, group).items(), per_channel.values()):
            np.testing.assert_array_equal(a, b, err_msg=f"group={group} {name}")
        assert storage_bytes(k, 5, bits, group) == storage_bytes(k, 5, bits, 0)
        np.testing.assert_array_equal(fake_quant(w, bits, group), rtn_reference(w, bits, 0))
