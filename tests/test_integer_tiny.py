"""int8-integer-only on a tiny random Llama (GQA, SwiGLU, RMSNorm, RoPE), in the default suite: the
integer passes (integer-swiglu, integer-lut, integer-attention, integer-norms) are otherwise only
exercised by the slow real-model tests.  Checks: the reference interpreter (lowbit ops by their
numpy references) equals ORT bit for bit on every integer tensor; the linears and norms are integer
(the float islands are shape arithmetic, RoPE and softmax); the logits stay near the QDQ graph the
integer passes started from (migrate-steps' output) — a wrong shift or a dropped zero point in a
norm or a residual rescale moves them by far more (tried: a factor of 2 in the residual rescale
of one add → 0.76, in the IntNorm's γ codes → 1.33; the bound is 0.15).
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
