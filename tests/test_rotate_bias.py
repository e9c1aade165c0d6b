"""Rotation on a model WITH biases (Qwen2-like: q/k/v biases; here also o/down biases, the residual
writers), float-equivalent through fold-norms and rotate with R1, R2 and the online Hadamard.

The biases are added to lowbit's Llama graph at the protobuf level (an ``Add`` after each chosen
MatMul), so the test model does not depend on the passes' own rewrite helpers.  Without the bias
folds (V's bias through R2, the writers' biases through R1) the logits move by far more than the
tolerance: each bias carries real signal (|b| comparable to the activations).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.ir.analysis import find_linears
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit_models import logits, rel_err, tokens

CFG = LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=32)
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
WRITERS = ("attn.o_proj", "mlp.down_proj")


def qwen_like(which=QKV + WRITERS, seed=0) -> ir.Model:
    w = random_llama_weights(CFG, seed)
    rng = np.random.default_rng(seed + 1)
    for k in ("attn_norm", "ffn_norm", "final_norm"):
        w[k] = (0.5 + rng.random(w[k].shape)).astype(np.float32)
    proto = ir.serde.serialize_model(build_llama(CFG, w))
    nodes = []
    for node in proto.graph.node:
        nodes.append(node)
        if node.op_type == "MatMul" and node.name.split(".", 2)[-1] in which:
            width = next(numpy_helper.to_array(i).shape[1] for i in proto.graph.initializer if i.name == node.input[1])
            bias = (0.5 * rng.standard_normal(width)).astype(np.float32)
            proto.graph.initializer.append(numpy_helper.from_array(bias, f"{node.name}.bias"))
            out = node.output[0]
            node.output[0] = f"{out}.nobias"
            nodes.append(helper.make_node("Add", [node.output[0], f"{node.name}.bias"], [out], name=f"{node.name}.add"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def test_the_model_has_the_biases():
    lins = find_linears(qwen_like().graph)
    biased = {lin.name.split(".", 2)[-1] for lin in lins if lin.bias is not None}
    assert biased == set(QKV + WRITERS)


@pytest.mark.parametrize("options", ["", "{kind=random}", "{online=false}"])
def test_rotation_with_biases_is_float_equivalent(options):
    model = qwen_like()
    feed = tokens(CFG.vocab_size, seq=16)
    ref = logits(model, feed)
    ctx = CompileContext(probes=[feed], show_progress=False)  # the verifier checks each pass on it too
    pm = PassManager.from_pipeline(f"fold-norms,rotate{options}", ctx)
    rotated = pm.run(model)
    assert rel_err(logits(rotated, feed), ref) <= 1e-4
    stats = pm.passes[1].stats
    assert stats["r2"] == CFG.n_layers, "R2 must reach every biased V→O pair"
    assert stats["r1_writers"] == 2 * CFG.n_layers


def test_the_biases_matter():
    """Dropping them changes the logits a lot: a rotation that ignored them could not pass above."""
    feed = tokens(CFG.vocab_size, seq=16)
    with_b, without = logits(qwen_like(), feed), logits(qwen_like(which=()), feed)
    assert rel_err(without, with_b) > 1e-2


def test_rotated_biases_are_rotated_not_copied():
    model = qwen_like()
    before = {lin.name: lin.bias.const_value.numpy().copy()
              for lin in find_linears(model.graph) if lin.bias is not None}
    rotated = PassManager.from_pipeline("fold-norms,rotate", CompileContext(show_progress=False)).run(model)
    after = {lin.name: lin.bias.const_value.numpy() for lin in find_linears(rotated.graph) if lin.bias is not None}
    for name, b in before.items():
        role = name.split(".", 2)[-1]
        if role in ("attn.q_proj", "attn.k_proj"):  # readers: bias unchanged (only Qᵀ·W)
            np.testing.assert_allclose(after[name], b, rtol=1e-6)
        else:  # v (R2 per head), o and down (R1): an orthogonal map keeps the norm, moves the vector
            assert np.linalg.norm(after[name]) == pytest.approx(np.linalg.norm(b), rel=1e-4)
            assert not np.allclose(after[name], b, atol=1e-3)


def _v_reshape_infers_head_dim(cfg):
    """V's head split written ``Reshape(v, [0, 0, H, -1])`` (head size inferred at run time, as some exports do)."""
    from lowbit.frontends.llama2c import build_llama, random_llama_weights

    model = build_llama(cfg, random_llama_weights(cfg, 5))
    for node in list(model.graph):
        if node.op_type == "Reshape" and node.inputs[0].name.endswith("attn.v_proj"):
            shape = ir.Value(name=f"{node.name}.inferred_shape",
                             const_value=ir.tensor(np.array([0, 0, cfg.n_kv_heads, -1], np.int64)))
            model.graph.register_initializer(shape)
            node.replace_input_with(1, shape)
    return model


def test_r2_without_a_known_head_size_is_skipped_not_guessed():
    """R2 rotates within heads; when V's head size is not a constant it must skip (float outputs unchanged)."""
    cfg = LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64, seq_len=32)
    feed = tokens(cfg.vocab_size, seq=16)
    for inferred in (False, True):
        if inferred:
            model = _v_reshape_infers_head_dim(cfg)
        else:
            from lowbit.frontends.llama2c import build_llama, random_llama_weights

            model = build_llama(cfg, random_llama_weights(cfg, 5))
        ref = logits(model, feed)
        pm = PassManager.from_pipeline("fold-norms,rotate", CompileContext(show_progress=False))
        out = pm.run(model)
        assert rel_err(logits(out, feed), ref) <= 1e-4
        stats = pm.passes[1].stats
        assert (stats["r2"], stats["r2_skipped"]) == ((0, cfg.n_layers) if inferred else (cfg.n_layers, 0)), stats


def _skip_norm_fused(seed=0) -> ir.Model:
    """The Llama graph in ORT's fused form: every residual Add feeding an RMSNorm becomes
    SkipSimplifiedLayerNormalization(stream, writer output, γ, bias) — its output 3 is the stream after the
    add — with a constant bias on the stream (as the transformer optimizer writes folded constants)."""
    w = random_llama_weights(CFG, seed)
    rng = np.random.default_rng(seed + 1)
    for k in ("attn_norm", "ffn_norm", "final_norm"):
        w[k] = (0.5 + rng.random(w[k].shape)).astype(np.float32)
    proto = ir.serde.serialize_model(build_llama(CFG, w))
    norm_of = {n.input[0]: n for n in proto.graph.node if n.op_type == "RMSNormalization"}
    nodes, dropped = [], set()
    for node in proto.graph.node:
        if node.op_type == "Add" and node.name.endswith("residual") and node.output[0] in norm_of:
            norm = norm_of[node.output[0]]
            bias = f"{node.name}.stream_bias"
            proto.graph.initializer.append(numpy_helper.from_array(
                (0.3 * rng.standard_normal(CFG.dim)).astype(np.float32), bias))
            eps = next(a.f for a in norm.attribute if a.name == "epsilon")
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [*node.input, norm.input[1], bias],
                                          [norm.output[0], "", "", node.output[0]], name=f"{node.name}.skip_norm",
                                          domain="com.microsoft", epsilon=eps))
            dropped.add(norm.name)
        elif node.name not in dropped:
            nodes.append(node)
    nodes = [n for n in nodes if n.name not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return ir.serde.deserialize_model(proto)


def test_rotation_through_fused_skip_norms_rotates_their_stream_bias():
    model = _skip_norm_fused()
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph) == 2 * CFG.n_layers
    feed = tokens(CFG.vocab_size, seq=16)
    ref = logits(model, feed)
    no_bias = _skip_norm_fused()
    for n in no_bias.graph:
        if n.op_type == "SkipSimplifiedLayerNormalization":
            n.inputs[3].const_value = ir.tensor(np.zeros(CFG.dim, np.float32), name=n.inputs[3].name)
    assert rel_err(logits(no_bias, feed), ref) > 1e-2, "the stream biases carry signal"
    pm = PassManager.from_pipeline("fold-norms,rotate", CompileContext(probes=[feed], show_progress=False))
    rotated = pm.run(model)
    assert rel_err(logits(rotated, feed), ref) <= 1e-4


def test_a_fused_skip_norm_summing_a_non_linear_is_refused_naming_it():
    """Rotation folds Q only into linears' outputs: a fused residual add over a Relu cannot be rotated."""
    from lowbit.errors import PassFailure

    model = _skip_norm_fused()
    skip = next(n for n in model.graph if n.op_type == "SkipSimplifiedLayerNormalization")
    relu = ir.node("Relu", [skip.inputs[1]], name="not_a_linear")
    model.graph.insert_before(skip, relu)
    skip.replace_input_with(1, relu.outputs[0])
    with pytest.raises(PassFailure, match="a fused residual add sums Relu output, not a linear layer's output"):
        PassManager.from_pipeline("fold-norms,rotate", CompileContext(show_progress=False)).run(model)
