"""canonicalize: Gemm → MatMul + Add and decomposed-norm fusion, float-equivalent."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir.analysis import find_groups, find_linears
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session

_DECOMPOSED = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] x) => (float[N, 3] y) <float[4] gamma = {1.0, 2.0, 0.5, 1.5}, float[4] beta = {0.1, 0.0, -0.2, 0.3},
  float[3, 4] w = {1,2,3,4,5,6,7,8,9,10,11,12}, float[3] c = {1, 2, 3}, float eps = {1e-5}, float two = {2.0},
  int64[1] ax = {-1}> {
    mean = ReduceMean <keepdims = 1> (x, ax)
    d = Sub (x, mean)
    sq = Pow (d, two)
    var = ReduceMean <keepdims = 1> (sq, ax)
    ve = Add (var, eps)
    sd = Sqrt (ve)
    n = Div (d, sd)
    s = Mul (n, gamma)
    h = Add (s, beta)
    y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (h, w, c)
}
"""


def test_gemm_and_decomposed_layernorm_become_canonical_and_smoothable():
    model = ir.serde.deserialize_model(onnx.parser.parse_model(_DECOMPOSED))
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32) * 3
    before = make_session(model).run(None, {"x": x})[0]
    pm = PassManager.from_pipeline("canonicalize", CompileContext())
    model = pm.run(model)
    assert [n.op_type for n in model.graph] == ["LayerNormalization", "MatMul", "Add"]
    assert pm.passes[0].stats["gemm_to_matmul"] == 1 and pm.passes[0].stats["norms_fused"] == 1
    after = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert [g.kind for g in find_groups(model.graph)] == ["norm"]  # smoothing can now fold into γ/β


def test_onnx_frontend_canonicalizes_files(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(_DECOMPOSED), path)
    model = lowbit.load_model(path)
    assert "Gemm" not in {n.op_type for n in model.graph}


def test_gemm_with_transposed_input_is_kept():
    text = _DECOMPOSED.replace("y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (h, w, c)",
                               "ht = Transpose (h)\n    y = Gemm <transA = 1, transB = 1> (ht, w, c)")
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    pm = PassManager.from_pipeline("canonicalize{norms=false}", CompileContext())
    pm.run(model)
    assert pm.passes[0].stats["gemm_kept"] == 1


@pytest.mark.parametrize("model_fixture", ["stories_model"])
def test_canonical_models_are_left_alone(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    ops = [n.op_type for n in model.graph]
    PassManager.from_pipeline("canonicalize", CompileContext()).run(model)
    assert [n.op_type for n in model.graph] == ops


_GEMM_C_INPUT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] x, float[N, 3] c) => (float[N, 3] y) <float[3, 4] w = {1,2,3,4,5,6,7,8,9,10,11,12}> {
    y = Gemm <transB = 1, alpha = 0.5, beta = BETA> (x, w, c)
}
"""


def test_gemm_whose_c_is_computed_keeps_it_as_an_add():
    """Gemm = alpha·A·Bᵀ + beta·C (ONNX spec), C a graph input: with beta = 1 the rewrite adds C as is."""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(_GEMM_C_INPUT.replace("BETA", "1.0")))
    pm = PassManager.from_pipeline("canonicalize{norms=false}", CompileContext())
    model = pm.run(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert model.graph.node(1).inputs[1] is model.graph.inputs[1], "C itself is added, not a copy or a constant"
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    w = np.arange(1, 13, dtype=np.float64).reshape(3, 4)
    want = 0.5 * x.astype(np.float64) @ w.T + c
    got = make_session(model).run(None, {"x": x, "c": c})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gemm_whose_c_is_computed_with_beta_is_refused():
    from lowbit.errors import PassFailure

    model = ir.serde.deserialize_model(onnx.parser.parse_model(_GEMM_C_INPUT.replace("BETA", "2.0")))
    with pytest.raises(PassFailure, match="non-constant C and beta != 1"):
        PassManager.from_pipeline("canonicalize{norms=false}", CompileContext()).run(model)


def test_a_canonical_model_with_large_weights_is_unchanged_and_reported_so():
    """Nothing to canonicalize (typed LayerNorm → MatMul + Add): the model must serialize to the same bytes and
    the pass must report modified=False (onnx_ir's shape inference re-registers initializers > 1 KB last; the
    verifier, on in tests, fails the pass if the bytes changed while it said nothing changed)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KB: shape inference takes it out and back
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
         onnx.helper.make_node("MatMul", ["h", "w"], ["mm"]), onnx.helper.make_node("Add", ["mm", "c"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.ones(64, np.float32), "gamma"),
         onnx.numpy_helper.from_array(np.zeros(64, np.float32), "beta"),
         onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "c")])
    proto = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, ir_version=10,
                                                                      opset_imports=[onnx.helper.make_opsetid("", 21)]))
    model = ir.serde.deserialize_model(proto)
    before = ir.serde.serialize_model(model).SerializeToString(deterministic=True)
    pm = PassManager.from_pipeline("canonicalize", CompileContext())
    result = pm.passes[0](model)
    assert list(model.graph.initializers) == ["w", "gamma", "beta", "c"]
    assert ir.serde.serialize_model(model).SerializeToString(deterministic=True) == before
    assert not result.modified


def test_a_head_tied_to_the_embedding_becomes_a_linear_layer():
    """torch's exporter writes a tied head as MatMul(h, Transpose(E)): the head must read Eᵀ as a constant weight
    (so that passes find and quantize it), the Gather keep E, and the outputs stay the same."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["E", "ids"], ["x"]),
         onnx.helper.make_node("LayerNormalization", ["x", "gamma"], ["h"], axis=-1),
         onnx.helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["h", "Et"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, "S"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "S", 10])],
        [onnx.numpy_helper.from_array(table, "E"), onnx.numpy_helper.from_array(np.ones(4, np.float32), "gamma")])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, ir_version=10,
                                                              opset_imports=[onnx.helper.make_opsetid("", 21)]))
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    before = make_session(model).run(None, {"ids": ids})[0]
    PassManager.from_pipeline("canonicalize", CompileContext()).run(model)
    assert "Transpose" not in [n.op_type for n in model.graph]
    (head,) = find_linears(model.graph)
    np.testing.assert_array_equal(head.weight.const_value.numpy(), table.T)
    assert next(n for n in model.graph if n.op_type == "Gather").inputs[0].name == "E"
    np.testing.assert_array_equal(make_session(model).run(None, {"ids": ids})[0], before)


def test_float16_casts_around_a_norm_vanish_with_the_float32_interior():
    """torch's float16 export computes a norm in float32 between two Casts; in the float32 interior both are
    identities and go, so the norm is the linears' producer again (smoothing and rotation fold into it)."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float16[N, 4] x) => (float16[N, 3] y) <float[4] gamma = {1.0, 2.0, 0.5, 1.5}, float16[4, 3] w =
      {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> {
        xf = Cast <to = 1> (x)
        n = LayerNormalization <axis = -1> (xf, gamma)
        h = Cast <to = 10> (n)
        y = MatMul (h, w)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float16)
    before = make_session(model).run(None, {"x": x})[0]
    PassManager.from_pipeline("canonicalize", CompileContext()).run(model)
    interior = [n for n in model.graph if not (n.op_type == "Cast" and (set(model.graph.inputs) & set(n.inputs)
                                                                          or set(model.graph.outputs) & set(n.outputs)))]
    assert [n.op_type for n in interior] == ["LayerNormalization", "MatMul"]
    assert [g.kind for g in find_groups(model.graph)] == ["norm"]
    after = make_session(model).run(None, {"x": x})[0]
    assert after.dtype == np.float16
    np.testing.assert_allclose(after.astype(np.float32), before.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_norm_scale_read_through_identity_becomes_a_constant_of_its_own():
    """optimum deduplicates equal initializers: a second LayerNorm reads γ as Identity(first γ).  After
    canonicalize every norm has a constant γ (integer-norms, smoothing and folding need it), named as the
    Identity's output, and the outputs are unchanged."""
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 4] x) => (float[N, 4] y) <float[4] ln1_weight = {1.0, 2.0, 0.5, 1.5}, float[4] ln1_bias = {0.1, 0.0,
      -0.2, 0.3}, float[4] ln2_bias = {0.0, 0.5, 0.0, -0.5}> {
        ln2_weight = Identity (ln1_weight)
        a = LayerNormalization <axis = -1> (x, ln1_weight, ln1_bias)
        y = LayerNormalization <axis = -1> (a, ln2_weight, ln2_bias)
    }
    """
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    before = make_session(model).run(None, {"x": x})[0]
    PassManager.from_pipeline("canonicalize", CompileContext()).run(model)
    norms = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert [n.op_type for n in model.graph] == ["LayerNormalization", "LayerNormalization"]
    assert [n.inputs[1].name for n in norms] == ["ln1_weight", "ln2_weight"]
    np.testing.assert_array_equal(norms[1].inputs[1].const_value.numpy(), [1.0, 2.0, 0.5, 1.5])
    np.testing.assert_array_equal(make_session(model).run(None, {"x": x})[0], before)
