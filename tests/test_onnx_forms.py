"""ONNX files as users export them, on small hand-built graphs (fast; the HF exports are in
test_conformance): opsets below 23, float16 interfaces, external data from another working
directory, KV-cache inputs with an empty past, context length, already-quantized inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import UnsupportedModelError

D, N = 16, 24
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((D, N)).astype(np.float32) * 0.3
W2 = RNG.standard_normal((N, D)).astype(np.float32) * 0.3
GAMMA = (1 + 0.1 * RNG.standard_normal(D)).astype(np.float32)


def _rms_mlp(opset: int, dtype=np.float32) -> onnx.ModelProto:
    """y = relu(rmsnorm(x)·W1)·W2 with RMSNorm decomposed the way exporters write it."""
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(a.astype(dtype), n) for a, n in
             ((W1, "fc1.weight"), (W2, "fc2.weight"), (GAMMA, "norm.weight"), (np.array(2.0, dtype), "two"),
              (np.array(1e-5, dtype), "eps"))]
    reduce = (helper.make_node("ReduceMean", ["sq"], ["ms"], keepdims=1, axes=[-1]) if opset < 18
              else helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1))
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             reduce,
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["xn"]),
             helper.make_node("Mul", ["xn", "norm.weight"], ["h"]),
             helper.make_node("MatMul", ["h", "fc1.weight"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "fc2.weight"], ["y"])]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "rms_mlp", [helper.make_tensor_value_info("x", t, ["b", "s", D])],
                              [helper.make_tensor_value_info("y", t, ["b", "s", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * GAMMA
    return np.maximum(h @ W1, 0) @ W2


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _feeds(dtype=np.float32, n=4):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 8, D)).astype(dtype)} for _ in range(n)]


@pytest.mark.parametrize("opset,op", [(17, "SimplifiedLayerNormalization"), (21, "SimplifiedLayerNormalization"),
                                      (23, "RMSNormalization")])
def test_rms_fusion_never_emits_an_op_newer_than_the_opset(tmp_path, opset, op):
    path = tmp_path / "m.onnx"
    onnx.save(_rms_mlp(opset), path)
    model = lowbit.load_model(path)
    ops = [n.op_type for n in model.graph]
    assert op in ops and "Pow" not in ops
    assert model.opset_imports[""] == max(opset, 21)
    out = tmp_path / "q.onnx"
    lowbit.compile(str(path), "w8a8-dynamic", calibration=_feeds(), output=out, progress=False)
    x = _feeds()[0]["x"]
    y = _run(out, x)
    assert np.linalg.norm(y - _reference(x)) / np.linalg.norm(_reference(x)) < 0.03


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16", "w8a8", "w8a8-dynamic"])
def test_float16_model_keeps_its_interface_and_loads(tmp_path, recipe):
    path = tmp_path / "m16.onnx"
    onnx.save(_rms_mlp(21, np.float16), path)
    out = tmp_path / "q.onnx"
    lowbit.compile(str(path), recipe, calibration=_feeds(np.float16), output=out, progress=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == sess.get_outputs()[0].type == "tensor(float16)"
    x = _feeds(np.float16)[0]["x"]
    y = sess.run(None, {"x": x})[0]
    ref = _reference(x)
    # 4-bit absmax RTN on Gaussian weights: step ≈ 2.5σ/7, error ≈ step/√12 ≈ 0.1σ per layer, two layers ≈ 0.14
    bound = 0.2 if recipe == "w4a16" else 0.03
    assert y.dtype == np.float16 and np.linalg.norm(y - ref) / np.linalg.norm(ref) < bound


def test_float64_interior_is_float32(tmp_path):
    path = tmp_path / "m64.onnx"
    onnx.save(_rms_mlp(21, np.float64), path)
    model = lowbit.load_model(path)
    assert model.graph.inputs[0].dtype == ir.DataType.DOUBLE
    assert all(v.const_value.dtype != ir.DataType.DOUBLE for v in model.graph.initializers.values())
    out = tmp_path / "f.onnx"
    ir.save(model, out)
    x = _feeds(np.float64)[0]["x"]
    y = _run(out, x)
    assert y.dtype == np.float64 and np.allclose(y, _reference(x), rtol=1e-4, atol=1e-5)


def _gemm_model() -> onnx.ModelProto:
    w = RNG.standard_normal((N, D)).astype(np.float32)  # Gemm with transB=1: [out, in]
    b = RNG.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
                              [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), w, b


def test_external_data_gemm_from_another_directory(tmp_path, monkeypatch):
    proto, w, b = _gemm_model()
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(proto, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    x = np.random.default_rng(2).standard_normal((8, D)).astype(np.float32)
    out = tmp_path / "out" / "q.onnx"
    lowbit.compile(str(folder / "m.onnx"), "w8a8-dynamic", calibration=[{"x": x}], output=out, progress=False)
    y = _run(out, x)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.02


def test_already_quantized_model_is_refused_naming_the_node(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_rms_mlp(21), path)
    out = tmp_path / "q.onnx"
    lowbit.compile(str(path), "w8a8-dynamic", calibration=_feeds(), output=out, progress=False)
    with pytest.raises(UnsupportedModelError, match=r"already quantized: node '.+'"):
        lowbit.compile(str(out), "w8a8-dynamic", calibration=_feeds(), output=tmp_path / "qq.onnx", progress=False)
    assert not (tmp_path / "qq.onnx").exists()


def _kv_decoder(positions: int) -> onnx.ModelProto:
    """Token embedding + learned positions, one linear reading [past; current] keys: an optimum-like form."""
    emb = RNG.standard_normal((32, D)).astype(np.float32)
    pos = RNG.standard_normal((positions, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["e"]),
             helper.make_node("Gather", ["pos.weight", "position_ids"], ["p"]),
             helper.make_node("Add", ["e", "p"], ["h"]),
             helper.make_node("Concat", ["past_key_values.0.key", "h"], ["present.0.key"], axis=1),
             helper.make_node("MatMul", ["present.0.key", "fc.weight"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", "past", D])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 32]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["b", "t", D])]
    inits = [numpy_helper.from_array(emb, "embed.weight"), numpy_helper.from_array(pos, "pos.weight"),
             numpy_helper.from_array(RNG.standard_normal((D, 32)).astype(np.float32), "fc.weight")]
    graph = helper.make_graph(nodes, "kv", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_prefill_with_empty_past_cut_to_context_calibrates(tmp_path):
    from lowbit.data.lm_feeds import context_length, lm_feeds

    path = tmp_path / "kv.onnx"
    onnx.save(_kv_decoder(positions=12), path)
    model = lowbit.load_model(path)
    assert context_length(model) == 10  # 12 rows, two spare for offset position tables
    feeds = lm_feeds(model, [list(range(1, 30)), [3, 4, 5]])
    assert [f["input_ids"].shape for f in feeds] == [(1, 10), (1, 3)]
    assert feeds[0]["past_key_values.0.key"].shape == (1, 0, D)
    assert feeds[0]["position_ids"].tolist() == [list(range(10))]
    out = tmp_path / "q.onnx"
    res = lowbit.compile(str(path), "w8a8", calibration=feeds, output=out, progress=False)
    assert res.report["calibration"] == {"samples": 2, "sequences": 2, "tokens": 13}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {o.name for o in sess.get_outputs()} == {"logits", "present.0.key"}
    got = sess.run(["logits"], feeds[0])[0]
    assert got.shape == (1, 10, 32) and np.all(np.isfinite(got))


def test_unsmoothed_layers_are_listed_with_their_reason(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_rms_mlp(21), path)
    res = lowbit.compile(str(path), "w8a8", calibration=_feeds(), progress=False)
    unsmoothed = res.report["smooth"]["unsmoothed"]
    assert unsmoothed == [{"layer": "fc2", "reason": "no foldable producer: produced by Relu"}]




def test_context_length_from_a_llama2c_header_cuts_text_calibration(tmp_path):
    """A llama2.c model's context (seq_len in its header) bounds text calibration samples."""
    from lowbit.data.datasets import load_calibration
    from lowbit.data.lm_feeds import context_length
    model = lowbit.load_model(_kv_free_decoder(tmp_path))
    model.metadata_props["lowbit.llama2c_config"] = "dim=16,seq_len=8,vocab_size=32"
    assert context_length(model) == 8

    class Tok:
        def encode(self, text, bos=True):
            return [1] + [3 + len(w) % 20 for w in text.split()]

    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(["a b c d e f g h i j k l m n", "a b"]), encoding="utf-8")
    feeds = load_calibration(model, text, tokenizer=Tok())
    assert [f["input_ids"].shape[1] for f in feeds] == [8, 3]


def _kv_free_decoder(tmp_path):
    """input_ids → logits: embedding and one linear (no position table: unbounded by the graph)."""
    emb = RNG.standard_normal((32, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "fc.weight"], ["logits"])]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 32])],
                              [numpy_helper.from_array(emb, "embed.weight"),
                               numpy_helper.from_array(RNG.standard_normal((D, 32)).astype(np.float32), "fc.weight")])
    path = tmp_path / "lm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    return path


def test_shared_zero_bias_does_not_name_every_layer():
    """Exporters merge identical constants: one zero bias named after a norm must not name the linears (OPT)."""
    from lowbit.ir.analysis import find_linears

    zero = np.zeros(D, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_a"], ["a"], name="/model/layers.0/fc1/MatMul"),
             helper.make_node("Add", ["a", "final_layer_norm.bias"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w_b"], ["b"], name="/model/layers.0/fc2/MatMul"),
             helper.make_node("Add", ["b", "final_layer_norm.bias"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                              [numpy_helper.from_array(RNG.standard_normal((D, D)).astype(np.float32), "w_a"),
                               numpy_helper.from_array(RNG.standard_normal((D, D)).astype(np.float32), "w_b"),
                               numpy_helper.from_array(zero, "final_layer_norm.bias")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert sorted(lin.name for lin in find_linears(model.graph)) == ["model.layers.0.fc1", "model.layers.0.fc2"]


def _if_model() -> onnx.ModelProto:
    """y = x·W in the main graph; an If whose branches compute x·W and 2·x·W from the outer scope."""
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_linear")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["e0"], name="else_linear"),
                               helper.make_node("Add", ["e0", "e0"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="main_linear"),
             helper.make_node("Shape", ["x"], ["sh"]), helper.make_node("ReduceSum", ["sh"], ["n"], keepdims=0),
             helper.make_node("Greater", ["n", "ten"], ["c"]),
             helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.int64(10), "ten")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_subgraph_reads_are_fenced_and_their_linears_reported(tmp_path):
    from lowbit.ir.subgraphs import subgraph_linears

    path = tmp_path / "if.onnx"
    onnx.save(_if_model(), path)
    model = lowbit.load_model(path)
    names = {n.name for n in model.graph}
    assert "x.branch.fence" in names  # the computed outer value reaches the body through an Identity
    assert "W.branch" in model.graph.initializers  # the body reads its own copy of the shared weight
    twice = lowbit.frontends.canonicalize(model)
    assert {n.name for n in twice.graph} == names  # idempotent: a fence's output is not fenced again
    assert [r["layer"] for r in subgraph_linears(model.graph)] in (["then_linear", "else_linear"],
                                                                   ["else_linear", "then_linear"])
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    from lowbit.ir.sessions import make_session

    got = make_session(model).run(None, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    res = lowbit.compile(str(path), "w8a8-dynamic-nosmooth", output=tmp_path / "q.onnx", progress=False)
    kept = {f["layer"]: f["reason"] for f in res.report["float_layers"]}
    assert set(kept) == {"then_linear", "else_linear"} and "If 'branch'" in kept["then_linear"]
