"""int8-integer-only on a tiny random Llama (GQA, SwiGLU, RMSNorm, RoPE), in the default suite: the
integer passes (integer-swiglu, integer-lut, integer-attention, integer-norms) are otherwise only
exercised by the slow real-model tests.  Checks: the reference interpreter (lowbit ops by their
numpy references) equals ORT bit for bit on every integer tensor; the linears and norms are integer
(the float islands are shape arithmetic, RoPE and softmax); the logits stay near the QDQ graph the
integer passes started from (migrate-steps' output) — a wrong shift or a dropped zero point in a
norm or a residual rescale moves them by far more (tried: a factor of 2 in the residual rescale
of one add → 0.76, in the IntNorm's γ codes → 1.33; the bound is 0.15).  A post-norm block (BERT's
form) reaches the paths a pre-norm decoder does not: a norm shared by the residual and the linears
(integer-norms derives the clone from its twin) and an integer Lookup for the FFN's Relu.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.ir.integer_check import check_integer_regions
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.passmanager.recipes import RECIPES
from lowbit_models import rel_err

CFG = LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)
INTEGER = RECIPES["int8-integer-only"].replace(",lower-lowbit,lower-ort", "")
QDQ = INTEGER.split(",dyadic")[0]


def _model():
    w = random_llama_weights(CFG, 0)
    rng = np.random.default_rng(1)
    for k in ("attn_norm", "ffn_norm", "final_norm"):
        w[k] = (0.5 + rng.random(w[k].shape)).astype(np.float32)
    return build_llama(CFG, w)


@pytest.fixture(scope="module")
def compiled():
    rng = np.random.default_rng(0)
    calib = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)} for _ in range(16)]
    probe = {"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)}
    qdq = PassManager.from_pipeline(QDQ, CompileContext(calibration=calib, show_progress=False)).run(_model())
    ctx = CompileContext(calibration=calib, show_progress=False)
    integer = PassManager.from_pipeline(INTEGER, ctx).run(_model())
    return qdq, integer, ctx.report, probe


def test_every_norm_and_swiglu_is_integer(compiled):
    _, integer, report, _ = compiled
    assert report["integer-norms"]["norms"] == 2 * CFG.n_layers + 1
    assert report["integer-swiglu"]["swiglu"] == CFG.n_layers
    ops = {n.op_type for n in integer.graph}
    assert not ops & {"RMSNormalization", "SimplifiedLayerNormalization", "Sigmoid"}, ops
    rep = check_integer_regions(integer)
    assert rep.float_ops.get("MatMul", 0) <= 2 * CFG.n_layers, "only attention's QKᵀ and PV may stay float"


def test_reference_equals_ort_bit_for_bit(compiled):
    from lowbit.runtime.reference import compare_graph_with_ort

    _, integer, _, probe = compiled
    compared, mismatches = compare_graph_with_ort(integer, [probe])
    assert compared > 50 and not mismatches, mismatches


def test_logits_stay_near_the_qdq_graph(compiled):
    from lowbit.backends.lower_lowbit import LowerLowbit

    qdq, integer, _, probe = compiled
    lowered = ir.serde.deserialize_model(ir.serde.serialize_model(integer))
    LowerLowbit()(lowered)
    got = make_session(lowered, optimize=False).run(None, probe)[0]
    want = make_session(qdq, optimize=False).run(None, probe)[0]
    assert rel_err(got, want) < 0.15  # measured 0.085 (integer rsqrt, LUTs, int16 residual steps)


def _post_norm_encoder():
    """A post-norm block (BERT's form): the first norm's output feeds the FFN AND the residual add, so
    migrate-steps clones it and integer-norms must derive the clone from its IntNorm twin (the shared
    path); the FFN's Relu becomes an integer Lookup."""
    import onnx.parser
    import onnx.shape_inference

    from onnx_text import HEADER

    c, h, n = 16, 32, 8
    rng = np.random.default_rng(0)

    def lit(a):
        return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))

    g0, b0, g1, b1 = 0.5 + rng.random(c), 0.3 * rng.standard_normal(c), 0.5 + rng.random(c), 0.3 * rng.standard_normal(c)
    w1, c1 = rng.standard_normal((c, h)) * 0.4, rng.standard_normal(h) * 0.2
    w2, c2 = rng.standard_normal((h, c)) * 0.3, rng.standard_normal(c) * 0.2
    w3 = rng.standard_normal((c, n)) * 0.3
    text = f"""
    g (float[b, t, {c}] x) => (float[b, t, {n}] y)
    <float[{c}] g0 = {{{lit(g0)}}}, float[{c}] b0 = {{{lit(b0)}}}, float[{c}] g1 = {{{lit(g1)}}},
     float[{c}] b1 = {{{lit(b1)}}}, float[{c}, {h}] w1 = {{{lit(w1)}}}, float[{h}] c1 = {{{lit(c1)}}},
     float[{h}, {c}] w2 = {{{lit(w2)}}}, float[{c}] c2 = {{{lit(c2)}}}, float[{c}, {n}] w3 = {{{lit(w3)}}}>
    {{
        h0 = LayerNormalization <axis = -1> (x, g0, b0)
        m1 = MatMul (h0, w1)
        a1 = Add (m1, c1)
        r1 = Relu (a1)
        m2 = MatMul (r1, w2)
        a2 = Add (m2, c2)
        s1 = Add (h0, a2)
        h1 = LayerNormalization <axis = -1> (s1, g1, b1)
        y = MatMul (h1, w3)
    }}"""
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(HEADER + text), strict_mode=True)
    calib = [{"x": rng.standard_normal((1, 24, c)).astype(np.float32)} for _ in range(8)]
    probe = {"x": rng.standard_normal((1, 24, c)).astype(np.float32)}
    return proto, calib, probe


def test_post_norm_encoder_shares_the_norm_and_stays_near_the_qdq_graph():
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.runtime.reference import compare_graph_with_ort

    proto, calib, probe = _post_norm_encoder()
    qdq = PassManager.from_pipeline(QDQ, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(proto))
    ctx = CompileContext(calibration=calib, show_progress=False)
    integer = PassManager.from_pipeline(INTEGER, ctx).run(ir.serde.deserialize_model(proto))
    rep = ctx.report
    assert rep["integer-norms"]["norms"] == 2 and rep["integer-norms"]["norms_shared"] == 1
    assert rep["integer-lut"]["tables"] == {"Relu": 1}
    assert {n.op_type for n in integer.graph} <= {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "Add",
                                                  "Cast", "IntNorm", "Lookup", "Requantize"}
    compared, mismatches = compare_graph_with_ort(integer, [probe])
    assert compared > 10 and not mismatches, mismatches
    LowerLowbit()(integer)
    got = make_session(integer, optimize=False).run(None, probe)[0]
    want = make_session(qdq, optimize=False).run(None, probe)[0]
    assert rel_err(got, want) < 0.04  # measured 0.018
