"""rotate on pre-LayerNorm decoders (GPT-2/OPT/GPT-NeoX/Phi-2 style): float-equivalent, Q fixes the ones vector.

LayerNorm(x; 1, 0) = x·C/σ(x·C) with C = I − 11ᵀ/d commutes with an orthogonal Q only when Q·1 = 1.
The reference below is a plain-numpy forward of the same weights (not the graph), and the rotation
is read back from the embedding (E' = E·Q) and checked to be orthogonal, to fix 1, and to be a real
rotation (far from I, spreading an outlier channel) — a Q that does not fix 1 fails the equivalence.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit.errors import PassFailure
from lowbit.ir.graph_builder import GraphBuilder
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session
from lowbit.passes.rotate import fix_ones

D, F, V, T = 32, 48, 40, 6


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    w = {"embed": r(V, D), "pos": r(T, D), "head": r(D, V)}
    w["embed"][:, 3] += 4.0  # an outlier channel, as trained LayerNorm models have
    for i in range(2):
        for n in ("ln1", "ln2"):
            w[f"{i}.{n}.g"], w[f"{i}.{n}.b"] = 1 + r(D), r(D)
        w[f"{i}.mix.w"], w[f"{i}.mix.b"] = r(D, D), r(D)
        w[f"{i}.fc1.w"], w[f"{i}.fc1.b"], w[f"{i}.fc2.w"], w[f"{i}.fc2.b"] = r(D, F), r(F), r(F, D), r(D)
    w["lnf.g"], w["lnf.b"] = 1 + r(D), r(D)
    return w


def _ln(x, g, b, eps=1e-5):
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps) * g + b


def _reference(w, ids, parallel):
    x = w["embed"][ids] + w["pos"][None, : ids.shape[1]]
    for i in range(2):
        a = _ln(x, w[f"{i}.ln1.g"], w[f"{i}.ln1.b"]) @ w[f"{i}.mix.w"] + w[f"{i}.mix.b"]
        h = _ln(x, w[f"{i}.ln2.g"], w[f"{i}.ln2.b"]) if parallel else _ln(x + a, w[f"{i}.ln2.g"], w[f"{i}.ln2.b"])
        m = np.maximum(h @ w[f"{i}.fc1.w"] + w[f"{i}.fc1.b"], 0) @ w[f"{i}.fc2.w"] + w[f"{i}.fc2.b"]
        x = x + (a + m) if parallel else x + a + m
    return _ln(x, w["lnf.g"], w["lnf.b"]) @ w["head"]


def _graph(w, parallel, axis=-1):
    g = GraphBuilder(opset=21)
    ids = g.input("tokens", TensorProto.INT64, [1, T])
    g.output("logits", TensorProto.FLOAT, [1, T, V])
    x = g.op("Add", [g.op("Gather", [g.init("embed", w["embed"]), ids]), g.init("pos", w["pos"])])

    def ln(v, p):
        return g.op("LayerNormalization", [v, g.init(f"{p}.g", w[f"{p}.g"]), g.init(f"{p}.b", w[f"{p}.b"])],
                    axis=axis, epsilon=1e-5)

    def lin(v, p):
        return g.op("Add", [g.op("MatMul", [v, g.init(f"{p}.w", w[f"{p}.w"])]), g.init(f"{p}.b", w[f"{p}.b"])])

    for i in range(2):
        a = lin(ln(x, f"{i}.ln1"), f"{i}.mix")
        if parallel:
            m = lin(g.op("Relu", [lin(ln(x, f"{i}.ln2"), f"{i}.fc1")]), f"{i}.fc2")
            x = g.op("Add", [x, g.op("Add", [a, m])])
        else:
            x = g.op("Add", [x, a])
            m = lin(g.op("Relu", [lin(ln(x, f"{i}.ln2"), f"{i}.fc1")]), f"{i}.fc2")
            x = g.op("Add", [x, m])
    g.op("MatMul", [ln(x, "lnf"), g.init("head.w", w["head"])], out="logits")
    return g.build("pre-ln")


def _run(model, pipeline):
    pm = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False))
    return pm.run(model), {p.name: p.stats for p in pm.passes}


@pytest.mark.parametrize("parallel, axis", [(False, -1), (True, -1), (False, 2)],
                         ids=["sequential", "parallel-residual", "sequential-axis-2"])  # axis 2: the last, spelled out
def test_rotation_of_a_layernorm_decoder_is_float_equivalent(parallel, axis):
    w = _weights()
    ids = np.random.default_rng(1).integers(0, V, (1, T))
    ref = _reference(w, ids, parallel)
    model = _graph(w, parallel, axis=axis)
    if axis >= 0:  # a positive axis is the last only where the rank is known: shapes inferred, as load_model does
        import onnx
        import onnx_ir as ir

        model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model)))
    np.testing.assert_allclose(make_session(model).run(None, {"tokens": ids})[0], ref, rtol=1e-4, atol=1e-4)
    rotated, stats = _run(model, "fold-norms,rotate")
    assert stats["rotate"]["layernorm"] == 5 and stats["rotate"]["r1_writers"] == 4
    got = make_session(rotated).run(None, {"tokens": ids})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    emb = next(n for n in rotated.graph if n.op_type == "Gather").inputs[0].const_value.numpy().astype(np.float64)
    q = np.linalg.lstsq(w["embed"].astype(np.float64), emb, rcond=None)[0]
    np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-4)
    np.testing.assert_allclose(q @ np.ones(D), np.ones(D), atol=1e-4)  # fixes the ones vector
    assert np.abs(q - np.eye(D)).max() > 0.1
    assert np.abs(emb[:, 3]).max() < 0.6 * np.abs(w["embed"][:, 3]).max()  # the outlier channel is spread


def test_fix_ones_is_orthogonal_and_keeps_the_centred_rotation():
    rng = np.random.default_rng(0)
    q0 = np.linalg.qr(rng.standard_normal((D, D)))[0]
    q = fix_ones(q0)
    np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-12)
    np.testing.assert_allclose(q @ np.ones(D), np.ones(D), atol=1e-12)
    c = np.eye(D) - np.ones((D, D)) / D
    x = rng.standard_normal((4, D))
    np.testing.assert_allclose(_ln(x @ q, 1, 0), _ln(x, 1, 0) @ q, atol=1e-10)  # LN(xQ) = LN(x)·Q
    assert not np.allclose(_ln(x @ q0, 1, 0), _ln(x, 1, 0) @ q0, atol=1e-3)  # ... which Q₀ alone breaks
    assert np.linalg.matrix_rank(q - q0) == 1 and np.allclose(c @ q @ c, c @ q)  # a rank-1 (Householder) change


def test_layernorm_over_another_axis_is_refused_naming_it():
    with pytest.raises(PassFailure, match=r"LayerNormalization over axis 1 .*does not commute"):
        _run(_graph(_weights(), False, axis=1), "fold-norms,rotate")
