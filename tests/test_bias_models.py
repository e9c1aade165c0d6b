"""Passes that fold scales into a PREVIOUS linear (smooth, awq: V→O and up→down; migrate-steps' case
is in test_migrate_steps_reference) on a model whose linears carry biases (Qwen2 has q/k/v biases; here also o/up/down).  The previous
linear's bias must be divided by the same per-channel scale as its output columns,
``(x·W + b)·diag(s)⁻¹ = x·(W·diag(s)⁻¹) + b·diag(s)⁻¹``; a fold that forgets the bias moves the
logits by far more than the tolerance (the biases carry real signal, see test_rotate_bias).
"""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit_models import logits, rel_err, tokens
from test_rotate_bias import CFG, QKV, WRITERS, qwen_like

WHICH = QKV + WRITERS + ("mlp.up_proj",)


def _calibration():
    return [tokens(CFG.vocab_size, batch=1, seq=16, seed=s) for s in range(4)]


@pytest.mark.parametrize("pipeline", ["calibrate,smooth{norms=false}", "calibrate,smooth{alpha=0.8}",
                                      "calibrate{rows=512},awq"])
def test_scale_folds_into_biased_producers_are_float_equivalent(pipeline):
    model = qwen_like(WHICH, seed=2)
    feed = tokens(CFG.vocab_size, seq=16, seed=9)
    ref = logits(model, feed)
    before = {lin.name: lin.bias.const_value.numpy().copy() for lin in find_linears(model.graph)
              if lin.bias is not None}
    ctx = CompileContext(calibration=_calibration(), probes=[feed], show_progress=False)
    out = PassManager.from_pipeline(pipeline, ctx).run(model)
    assert rel_err(logits(out, feed), ref) <= 1e-4
    after = {lin.name: lin.bias.const_value.numpy() for lin in find_linears(out.graph) if lin.bias is not None}
    moved = [n for n in before if n.endswith(("v_proj", "up_proj")) and not np.allclose(after[n], before[n])]
    assert len(moved) == 2 * CFG.n_layers, f"every biased V and up projection is a folded producer: {moved}"


def test_smooth_divides_the_producer_bias_by_the_consumer_scale():
    """b_v' = b_v / s with s read back from O's weight rows (W_o' = diag(s)·W_o): the bias uses the same s."""
    model = qwen_like(WHICH, seed=2)
    lins = {lin.name: lin for lin in find_linears(model.graph)}
    name = next(n for n in lins if n.endswith("attn.v_proj"))
    o_name = name.replace("v_proj", "o_proj")
    b_v, w_o = lins[name].bias.const_value.numpy().astype(np.float64), lins[o_name].weight.const_value.numpy()
    ctx = CompileContext(calibration=_calibration(), show_progress=False)
    out = PassManager.from_pipeline("calibrate,smooth{norms=false}", ctx).run(model)
    lins = {lin.name: lin for lin in find_linears(out.graph)}
    s_o = lins[o_name].weight.const_value.numpy().astype(np.float64)[:, 0] / w_o[:, 0]  # per O input channel
    heads, kv = CFG.n_heads, CFG.n_kv_heads
    hd = CFG.dim // heads
    s_v = s_o.reshape(kv, heads // kv, hd)[:, 0, :].reshape(-1)  # GQA: O channels of one KV head share V's s
    np.testing.assert_allclose(s_o.reshape(kv, heads // kv, hd), np.broadcast_to(s_v.reshape(kv, 1, hd),
                                                                                   (kv, heads // kv, hd)), rtol=1e-5)
    assert np.ptp(s_v) > 0.1, "the case must smooth with scales that differ per channel"
    np.testing.assert_allclose(lins[name].bias.const_value.numpy(), b_v / s_v, rtol=1e-5)



@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smooth_v_to_o_scales_follow_the_paper_with_gqa(alpha):
    """SmoothQuant on the V→O group: per V channel j, over the O input channels c that read it (GQA:
    every query head of one KV head), s_j = max_c max|X_c|^α / max_c max|W_o[c,:]|^(1−α), X = O's
    input on the calibration tokens, measured here by running the float model in ORT."""
    import onnx

    from lowbit.ir.sessions import make_session, to_proto

    model = qwen_like(WHICH, seed=2)
    lins = {lin.name: lin for lin in find_linears(model.graph)}
    o_name = next(n for n in lins if n.endswith("attn.o_proj"))
    x_name, w_o = lins[o_name].input.name, lins[o_name].weight.const_value.numpy().astype(np.float64)
    proto = to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, None))
    sess = make_session(proto, optimize=False)
    xs = np.concatenate([sess.run([x_name], f)[0].reshape(-1, w_o.shape[0]) for f in _calibration()])
    heads, kv, hd = CFG.n_heads, CFG.n_kv_heads, CFG.dim // CFG.n_heads
    c = np.arange(w_o.shape[0])
    v_of = (c // hd) // (heads // kv) * hd + c % hd  # O input channel -> V output channel
    px, pw = np.zeros(kv * hd), np.zeros(kv * hd)
    np.maximum.at(px, v_of, np.abs(xs).max(0))
    np.maximum.at(pw, v_of, np.abs(w_o).max(1))
    want = np.clip(px ** alpha / pw ** (1 - alpha), 1e-4, 1e4)

    ctx = CompileContext(calibration=_calibration(), show_progress=False)
    out = PassManager.from_pipeline(f"calibrate,smooth{{norms=false,alpha={alpha}}}", ctx).run(model)
    w_o_after = {lin.name: lin for lin in find_linears(out.graph)}[o_name].weight.const_value.numpy()
    s_o = w_o_after.astype(np.float64)[:, 0] / w_o[:, 0]
    np.testing.assert_allclose(s_o, want[v_of], rtol=1e-4)
