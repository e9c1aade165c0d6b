"""rotate: R1/R2/online-Hadamard folding is float-equivalent; refuses non-unit norms and post-norm models."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit.errors import PassFailure
from lowbit.ir.graph_builder import GraphBuilder
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session
from lowbit_models import logits, random_llama, rel_err, stories260k, tokens


def _run(model, pipeline):
    pm = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False))
    return pm.run(model), {p.name: p.stats for p in pm.passes}


def _realistic():  # FFN width 688 = 16·43: the online Hadamard needs a Kronecker factor
    return random_llama(dim=256, hidden=688, layers=2, heads=8, kv=4, vocab=512)


@pytest.mark.parametrize("make", [stories260k, _realistic], ids=["stories260K", "random-llama-256"])
@pytest.mark.parametrize("options", ["", "{kind=random}", "{r2=false,online=false}"])
def test_rotation_is_float_equivalent(make, options):
    model = make()
    feed = tokens(512)
    ref = logits(model, feed)
    rotated, stats = _run(model, f"fold-norms,rotate{options}")
    assert rel_err(logits(rotated, feed), ref) <= 1e-4
    s = stats["rotate"]
    assert s["r1_readers"] > 0 and s["r1_writers"] > 0
    if not options:
        assert s["r2"] == s["online_hadamard"] > 0
        ops = [n.op_type for n in rotated.graph]
        assert ops.count("Hadamard") == s["online_hadamard"]
        # the fast lowering (Kronecker form with standard ops) gives the same logits
        lowered = PassManager.from_pipeline("lower-nbits", CompileContext(properties={"quantized"})).run(rotated)
        assert "Hadamard" not in {n.op_type for n in lowered.graph}
        assert rel_err(make_session(lowered).run(None, feed)[0], ref) <= 1e-4


def test_rotation_spreads_the_embedding():
    model = stories260k()
    before = max(abs(v.const_value.numpy()).max() for v in model.graph.initializers.values()
                 if v.name == "embed.weight")
    rotated, _ = _run(model, "fold-norms,rotate")
    emb = next(n for n in rotated.graph if n.op_type == "Gather").inputs[0].const_value.numpy()
    assert np.abs(emb).max() < before  # a Hadamard spreads outlier coordinates


def test_rotate_without_fold_norms_refuses():
    with pytest.raises(PassFailure, match="fold-norms"):
        _run(random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=64), "rotate")


def test_post_norm_encoder_refuses():
    rng = np.random.default_rng(0)
    g = GraphBuilder(opset=23)
    ids = g.input("input_ids", TensorProto.INT64, [1, 4])
    g.output("y", TensorProto.FLOAT, [1, 4, 16])
    x = g.op("Gather", [g.init("embed.weight", rng.standard_normal((32, 16)).astype(np.float32)), ids])
    h = g.op("MatMul", [x, g.init("attn.weight", rng.standard_normal((16, 16)).astype(np.float32))])
    x = g.op("Add", [x, h])
    g.op("LayerNormalization", [x, g.init("ln.weight", np.ones(16, np.float32)),
                                g.init("ln.bias", np.zeros(16, np.float32))], out="y", axis=-1)
    with pytest.raises(PassFailure, match="post-norm|LayerNormalization"):
        _run(g.build("bert-ish"), "fold-norms,rotate")


def _weights(model):
    from lowbit.ir.analysis import find_linears

    return {lin.name: lin.weight.const_value.numpy().astype(np.float64) for lin in find_linears(model.graph)}


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_the_rotation_is_the_papers(kind):
    """QuaRot's method, not just some equivalence: Q read back from the embedding (E' = E·Q) is orthogonal,
    and for kind=hadamard a randomised Hadamard (every |Q_ij| = 1/√d); readers get Qᵀ·W, writers W·Q; R2 is
    an orthogonal (Hadamard) block per head on V's columns, its transpose on O's rows.  Q = I, or a Q that
    is not the Hadamard, is float-equivalent too, and fails here."""
    import onnx_ir as ir

    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    folded, _ = _run(model, "fold-norms")
    before = ir.serde.deserialize_model(ir.serde.serialize_model(folded))
    rotated, _ = _run(folded, f"rotate{{kind={kind}}}")
    emb = lambda m: next(n for n in m.graph if n.op_type == "Gather").inputs[0].const_value.numpy()  # noqa: E731
    e0, e1 = emb(before).astype(np.float64), emb(rotated).astype(np.float64)
    q = np.linalg.lstsq(e0, e1, rcond=None)[0]
    d = q.shape[0]
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-4)
    if kind == "hadamard":
        np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(d), atol=1e-4)
    else:
        assert np.abs(np.abs(q) - 1 / np.sqrt(d)).max() > 0.05, "kind=random is not a Hadamard"
    assert np.abs(q - np.eye(d)).max() > 0.1
    w0, w1 = _weights(before), _weights(rotated)
    for name in ("layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.mlp.gate_proj"):
        np.testing.assert_allclose(w1[name], q.T @ w0[name], atol=1e-4, err_msg=name)
    hd = 16
    v0 = q.T @ w0["layers.0.attn.v_proj"]  # R1 first, then R2 on each head's columns
    for h in range(v0.shape[1] // hd):
        cols = slice(h * hd, (h + 1) * hd)
        r2 = np.linalg.lstsq(v0[:, cols], w1["layers.0.attn.v_proj"][:, cols], rcond=None)[0]
        np.testing.assert_allclose(r2.T @ r2, np.eye(hd), atol=1e-4)
        if kind == "hadamard":
            np.testing.assert_allclose(np.abs(r2), 1 / np.sqrt(hd), atol=1e-4)
        o_rows = [slice(g * hd, (g + 1) * hd) for g in range(4) if g // 2 == h]  # GQA: 2 query heads per KV head
        for rows in o_rows:
            np.testing.assert_allclose(w1["layers.0.attn.o_proj"][rows], r2.T @ w0["layers.0.attn.o_proj"][rows] @ q,
                                       atol=1e-4)


def _scaled_stream(op_inputs: str, int32_ids: bool = False):
    """Embedding → ``Div`` by a scalar (the stream as dividend ``x / c``, or as divisor ``c / x``) → a pre-norm
    block (RMSNorm with γ = 1, a linear added back) → a final RMSNorm and head."""
    rng = np.random.default_rng(3)
    d = 16
    g = GraphBuilder(opset=23)
    ids = g.input("input_ids", TensorProto.INT32 if int32_ids else TensorProto.INT64, [1, 5])
    g.output("y", TensorProto.FLOAT, [1, 5, 8])
    if int32_ids:  # token ids arrive as int32 and are cast (an index path from the graph input)
        ids = g.op("Cast", [ids], to=TensorProto.INT64)
    x = g.op("Gather", [g.init("embed.weight", rng.standard_normal((32, d)).astype(np.float32)), ids])
    c = g.init("c", np.array(2.5, np.float32))
    x = g.op("Div", [x, c] if op_inputs == "x/c" else [c, x])
    one = lambda n: g.init(n, np.ones(d, np.float32))  # noqa: E731
    n = g.op("RMSNormalization", [x, one("n1.weight")], axis=-1)
    h = g.op("MatMul", [n, g.init("l1.weight", rng.standard_normal((d, d)).astype(np.float32))])
    x = g.op("Add", [x, h])
    n = g.op("RMSNormalization", [x, one("n2.weight")], axis=-1)
    g.op("MatMul", [n, g.init("head.weight", rng.standard_normal((d, 8)).astype(np.float32))], out="y")
    return g.build("scaled-stream")


def test_a_stream_divided_by_a_scalar_is_rotated_and_a_scalar_divided_by_it_is_refused():
    """``R·(x/c) = (R·x)/c``: a scalar divisor commutes with the rotation (as Gemma's ·√d does) and the rotated
    model equals the float one; ``c/x`` is elementwise non-linear in x and does not commute, so rotate refuses."""
    feed = {"input_ids": np.array([[1, 7, 30, 2, 9]], np.int64)}
    model = _scaled_stream("x/c")
    ref = make_session(model, optimize=False).run(None, feed)[0]
    rotated, stats = _run(model, "rotate{online=false}")
    assert stats["rotate"]["r1_readers"] > 0
    assert rel_err(make_session(rotated, optimize=False).run(None, feed)[0], ref) <= 1e-5
    with pytest.raises(PassFailure):
        _run(_scaled_stream("c/x"), "rotate{online=false}")


def test_learned_positions_added_to_the_embedding_are_rotated_alike():
    """GPT-2/OPT form: ``x = E[ids] + P[positions]`` starts the stream.  R·x = R·E[ids] + R·P[positions], so both
    tables take the rotation, and the walk goes on past the Add (the block after it must be rotated too)."""
    rng = np.random.default_rng(4)
    d = 16
    g = GraphBuilder(opset=23)
    ids = g.input("input_ids", TensorProto.INT64, [1, 5])
    pos = g.input("position_ids", TensorProto.INT64, [1, 5])
    g.output("y", TensorProto.FLOAT, [1, 5, 8])
    x = g.op("Gather", [g.init("embed.weight", rng.standard_normal((32, d)).astype(np.float32)), ids])
    p = g.op("Gather", [g.init("pos.weight", rng.standard_normal((8, d)).astype(np.float32)), pos])
    x = g.op("Add", [x, p])
    one = lambda n: g.init(n, np.ones(d, np.float32))  # noqa: E731
    n = g.op("RMSNormalization", [x, one("n1.weight")], axis=-1)
    h = g.op("MatMul", [n, g.init("l1.weight", rng.standard_normal((d, d)).astype(np.float32))])
    x = g.op("Add", [x, h])
    n = g.op("RMSNormalization", [x, one("n2.weight")], axis=-1)
    g.op("MatMul", [n, g.init("head.weight", rng.standard_normal((d, 8)).astype(np.float32))], out="y")
    model = g.build("learned-positions")
    feed = {"input_ids": np.array([[1, 7, 30, 2, 9]], np.int64), "position_ids": np.arange(5, dtype=np.int64)[None]}
    ref = make_session(model, optimize=False).run(None, feed)[0]
    table = model.graph.initializers["pos.weight"].const_value.numpy().copy()
    rotated, stats = _run(model, "rotate{online=false}")
    assert stats["rotate"]["r1_readers"] == 2 and stats["rotate"]["r1_writers"] >= 1
    assert rel_err(make_session(rotated, optimize=False).run(None, feed)[0], ref) <= 1e-5
    pos_after = next(n for n in rotated.graph if n.op_type == "Gather" and n.inputs[1].name == "position_ids")
    got = pos_after.inputs[0].const_value.numpy().astype(np.float64)
    assert not np.allclose(got, table)  # rotated: the same row norms, other coordinates
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(table, axis=1), rtol=1e-5)


def test_token_ids_cast_before_the_embedding_still_start_the_stream():
    """The embedding is found through an index path (Cast, Reshape, …) from the graph input: int32 ids cast to int64
    are still the token input, and the rotated model equals the float one."""
    feed = {"input_ids": np.array([[1, 7, 30, 2, 9]], np.int32)}
    model = _scaled_stream("x/c", int32_ids=True)
    ref = make_session(model, optimize=False).run(None, feed)[0]
    rotated, stats = _run(model, "rotate{online=false}")
    assert stats["rotate"]["r1_readers"] > 0
    assert rel_err(make_session(rotated, optimize=False).run(None, feed)[0], ref) <= 1e-5
