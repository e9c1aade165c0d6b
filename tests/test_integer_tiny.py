"""int8-integer-only on a tiny random Llama (GQA, SwiGLU, RMSNorm, RoPE), in the default suite: the
integer passes (integer-swiglu, integer-lut, integer-attention, integer-norms) are otherwise only
exercised by the slow real-model tests.  Checks: the reference interpreter (lowbit ops by their
numpy references) equals ORT bit for bit on every integer tensor; the linears and norms are integer
(the float islands are shape arithmetic, RoPE and softmax); the logits stay near the QDQ graph the
integer passes started from (migrate-steps' output) — a wrong shift or a dropped zero point in a
norm or a residual rescale moves them by far more (tried: a factor of 2 in the residual rescale
of one add → 0.76, in the IntNorm's γ codes → 1.33; the bound is 0.15).  A post-norm encoder layer
(BERT's form) reaches the paths a pre-norm RoPE decoder does not: integer-attention (Q·Kᵀ, softmax,
P·V; it does not fire on the RoPE decoder), norms shared by the residual and the linears
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


def _post_norm_encoder(scale: str = "Mul", bert_mask: bool = False):
    """A post-norm encoder layer (BERT's form, 2 heads, scale on Q): each norm's output feeds the next
    block AND the residual add, so migrate-steps clones it and integer-norms must derive the clone from
    its IntNorm twin (the shared path); integer-attention turns Q·Kᵀ, softmax and P·V integer; the
    FFN's Relu becomes an integer Lookup.  ``bert_mask``: a padding mask ``Where(keep, 0, −10000)`` added to the
    scores (BERT's constant, the documented bound −1e4 itself) and a Softmax without ``axis`` (default −1)."""
    import onnx.parser
    import onnx.shape_inference

    from onnx_text import HEADER

    c, h, n, heads, t = 16, 32, 8, 2, 24
    rng = np.random.default_rng(0)

    def lit(a):
        return ", ".join(f"{v:.9g}" for v in np.asarray(a).reshape(-1))

    shapes = {"wq": (c, c), "wk": (c, c), "wv": (c, c), "wo": (c, c), "w1": (c, h), "w2": (h, c), "w3": (c, n),
              "bq": (c,), "bk": (c,), "bv": (c,), "bo": (c,), "c1": (h,), "c2": (c,)}
    consts = {k: rng.standard_normal(s) * (0.4 if k.startswith("w") else 0.2) for k, s in shapes.items()}
    for i in range(3):
        consts[f"g{i}"], consts[f"b{i}"] = 0.5 + rng.random(c), 0.3 * rng.standard_normal(c)
    decl = ", ".join(f"float[{', '.join(map(str, a.shape))}] {k} = {{{lit(a)}}}" for k, a in consts.items())
    text = f"""
    g (float[1, {t}, {c}] x{", bool[1, 1, 1, %d] keep" % t if bert_mask else ""}) => (float[1, {t}, {n}] y)
    <{decl}{", float zero = {0.0}, float big = {-10000.0}" if bert_mask else ""}, int64[4] split = {{1, {t}, {heads}, {c // heads}}}, int64[3] merge = {{1, {t}, {c}}},
     float alpha = {{{(1 / np.sqrt(c // heads)) if scale == "Mul" else np.sqrt(c // heads):.9g}}}>
    {{
        h0 = LayerNormalization <axis = -1> (x, g0, b0)
        q0 = MatMul (h0, wq)
        q1 = Add (q0, bq)
        k0 = MatMul (h0, wk)
        k1 = Add (k0, bk)
        v0 = MatMul (h0, wv)
        v1 = Add (v0, bv)
        q2 = Reshape (q1, split)
        k2 = Reshape (k1, split)
        v2 = Reshape (v1, split)
        q3 = Transpose <perm = [0, 2, 1, 3]> (q2)
        k3 = Transpose <perm = [0, 2, 3, 1]> (k2)
        v3 = Transpose <perm = [0, 2, 1, 3]> (v2)
        q4 = {scale} (q3, alpha)
        {"s0" if bert_mask else "s"} = MatMul (q4, k3)
        {"m = Where (keep, zero, big)" if bert_mask else ""}
        {"s = Add (s0, m)" if bert_mask else ""}
        p = Softmax {"" if bert_mask else "<axis = -1>"} (s)
        ctx0 = MatMul (p, v3)
        ctx1 = Transpose <perm = [0, 2, 1, 3]> (ctx0)
        ctx2 = Reshape (ctx1, merge)
        o0 = MatMul (ctx2, wo)
        o1 = Add (o0, bo)
        r1 = Add (h0, o1)
        h1 = LayerNormalization <axis = -1> (r1, g1, b1)
        m1 = MatMul (h1, w1)
        a1 = Add (m1, c1)
        f1 = Relu (a1)
        m2 = MatMul (f1, w2)
        a2 = Add (m2, c2)
        r2 = Add (h1, a2)
        h2 = LayerNormalization <axis = -1> (r2, g2, b2)
        y = MatMul (h2, w3)
    }}"""
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(HEADER + text), strict_mode=True)
    calib = [{"x": rng.standard_normal((1, t, c)).astype(np.float32)} for _ in range(8)]
    probe = {"x": rng.standard_normal((1, t, c)).astype(np.float32)}
    if bert_mask:  # the last positions are padding
        for i, f in enumerate([*calib, probe]):
            f["keep"] = (np.arange(t) < t - 1 - i % 5).reshape(1, 1, 1, t)
    return proto, calib, probe


@pytest.mark.parametrize("scale", ["Mul", "Div", "Mul-bert-mask"])  # Q·(1/√d) or Q/√d: both forms occur in exports
def test_post_norm_encoder_shares_the_norm_and_stays_near_the_qdq_graph(scale):
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.runtime.reference import compare_graph_with_ort

    proto, calib, probe = _post_norm_encoder(scale.split("-")[0], bert_mask=scale.endswith("bert-mask"))
    qdq = PassManager.from_pipeline(QDQ, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(proto))
    ctx = CompileContext(calibration=calib, show_progress=False)
    integer = PassManager.from_pipeline(INTEGER, ctx).run(ir.serde.deserialize_model(proto))
    rep = ctx.report
    assert rep["integer-norms"]["norms"] == 3 and rep["integer-norms"]["norms_shared"] == 2
    assert rep["integer-lut"]["tables"] == {"Relu": 1} and rep["integer-attention"]["attention"] == 1
    assert {n.op_type for n in integer.graph} <= {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "Add",
                                                  "Cast", "IntNorm", "IntSoftmax", "Lookup", "Requantize",
                                                  "Reshape", "Transpose"}
    compared, mismatches = compare_graph_with_ort(integer, [probe])
    assert compared > 10 and not mismatches, mismatches
    LowerLowbit()(integer)
    got = make_session(integer, optimize=False).run(None, probe)[0]
    want = make_session(qdq, optimize=False).run(None, probe)[0]
    assert rel_err(got, want) < 0.12  # measured 0.064 (3 integer norms, integer softmax, a Relu table)


@pytest.mark.parametrize("last", ["integer-swiglu", "integer-lut", "integer-attention", "integer-norms"])
def test_each_integer_pass_leaves_no_dead_nodes(last):
    """Each integer pass removes the float nodes it replaced (no node whose outputs nothing reads), also when it is
    the last pass run — not only because a later pass of the recipe happens to clean up."""
    proto, calib, _ = _post_norm_encoder("Mul")
    pipeline = INTEGER[: INTEGER.index(last) + len(last)]
    model = PassManager.from_pipeline(pipeline, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(proto))
    outputs = set(model.graph.outputs)
    dead = [n.name for n in model.graph
            if all(not list(o.uses()) and o not in outputs for o in n.outputs)]
    assert dead == [], dead
