"""canonicalize: Gemm → MatMul + Add and decomposed-norm fusion, float-equivalent."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from lowbit.ir.analysis import find_groups
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
