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
