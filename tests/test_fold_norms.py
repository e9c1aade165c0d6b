"""fold-norms: γ (and β) move into the consuming linears; outputs unchanged; non-linear consumers skip."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto

from lowbit.ir.analysis import const_array
from lowbit.ir.graph_builder import GraphBuilder
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session
from lowbit_models import logits, random_llama, rel_err, stories260k, tokens


def _run(model, pipeline="fold-norms"):
    pm = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False))
    model = pm.run(model)
    return model, pm.passes[0].stats


def _norm_scales(model):
    return [const_array(n.inputs[1]) for n in model.graph if n.op_type == "RMSNormalization"]


@pytest.mark.parametrize("make", [stories260k, random_llama], ids=["stories260K", "random-llama"])
def test_fold_norms_is_float_equivalent(make):
    model = make()
    vocab = model.graph.outputs[0].shape[-1]
    feed = tokens(vocab)
    before = logits(model, feed)
    model, stats = _run(model)
    after = logits(model, feed)
    assert rel_err(after, before) <= 1e-5
    assert stats["folded"] == len(_norm_scales(model))
    assert all(np.all(g == 1) for g in _norm_scales(model))


def test_fold_norms_twice_changes_nothing():
    model, _ = _run(random_llama())
    model, stats = _run(model)
    assert stats["folded"] == 0 and stats["already_unit"] > 0


def _layernorm_graph(extra_consumer: bool, bias: bool = True):
    rng = np.random.default_rng(0)
    g = GraphBuilder(opset=23)
    x = g.input("x", TensorProto.FLOAT, [2, 5, 8])
    g.output("y", TensorProto.FLOAT, [2, 5, 6])
    h = g.op("LayerNormalization", [x, g.init("ln.weight", rng.random(8).astype(np.float32) + 0.5),
                                    g.init("ln.bias", rng.standard_normal(8).astype(np.float32))], name="ln", axis=-1)
    a = g.op("MatMul", [h, g.init("a.weight", rng.standard_normal((8, 6)).astype(np.float32))], name="a")
    if bias:
        a = g.op("Add", [a, g.init("a.bias", rng.standard_normal(6).astype(np.float32))], name="a_bias")
    b = g.op("MatMul", [h, g.init("b.weight", rng.standard_normal((8, 6)).astype(np.float32))], name="b")
    y = g.op("Add", [a, b], name="sum")
    if extra_consumer:
        y = g.op("Add", [y, g.op("ReduceMean", [h, g.const([-1])], name="mean")], name="plus_mean")
    g.op("Identity", [y], name="out", out="y")
    return g.build("ln")


def test_fold_layernorm_beta_becomes_bias():
    model = _layernorm_graph(extra_consumer=False)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)}
    before = make_session(model, optimize=False).run(None, feed)[0]
    model, stats = _run(model)
    after = make_session(model, optimize=False).run(None, feed)[0]
    assert stats["folded"] == 1
    assert rel_err(after, before) <= 1e-5
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert np.all(const_array(ln.inputs[1]) == 1) and np.all(const_array(ln.inputs[2]) == 0)
    assert sum(n.op_type == "Add" and n.metadata_props.get("lowbit.origin") == "fold-norms"
               for n in model.graph) == 1  # 'b' had no bias: one Add is created for β·W


def test_norm_feeding_a_non_linear_is_skipped():
    model = _layernorm_graph(extra_consumer=True)
    text = str(model.graph)
    model, stats = _run(model)
    assert stats["folded"] == 0 and stats["skipped_non_linear_consumer"] == 1
    assert str(model.graph) == text


def test_layernorm_twice_changes_nothing_and_unit_gamma_with_beta_still_folds():
    """After one fold the LayerNorm is γ = 1, β = 0: a second run must not fire (β = 0 is "already unit").
    γ = 1 with β ≠ 0 is not unit: β still moves into the linears' bias."""
    from onnx_text import digest

    model, stats = _run(_layernorm_graph(extra_consumer=False))
    assert stats["folded"] == 1
    again, stats = _run(model)
    assert stats["folded"] == 0 and stats["already_unit"] == 1
    before = digest(again)
    assert digest(_run(again)[0]) == before
    model = _layernorm_graph(extra_consumer=False)
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    ln.inputs[1].const_value = __import__("onnx_ir").tensor(np.ones(8, np.float32), name=ln.inputs[1].name)
    feed = {"x": np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)}
    ref = make_session(model, optimize=False).run(None, feed)[0]
    model, stats = _run(model)
    assert stats["folded"] == 1 and stats["already_unit"] == 0
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert np.all(const_array(ln.inputs[2]) == 0)
    assert rel_err(make_session(model, optimize=False).run(None, feed)[0], ref) <= 1e-5


def test_a_bias_made_for_a_head_that_is_the_graph_output_keeps_the_output_typed():
    """OPT's head has no bias and writes the graph output: the Add made for β·W becomes the output and must carry
    its type and shape (an untyped graph output is an invalid model)."""
    import onnx

    from lowbit.ir.sessions import to_proto

    rng = np.random.default_rng(0)
    g = GraphBuilder(opset=23)
    x = g.input("x", TensorProto.FLOAT, [2, 5, 8])
    g.output("y", TensorProto.FLOAT, [2, 5, 6])
    h = g.op("LayerNormalization", [x, g.init("ln.weight", rng.random(8).astype(np.float32) + 0.5),
                                    g.init("ln.bias", rng.standard_normal(8).astype(np.float32))], name="ln", axis=-1)
    g.op("MatMul", [h, g.init("head.weight", rng.standard_normal((8, 6)).astype(np.float32))], name="head", out="y")
    model = g.build("head")
    feed = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    before = make_session(model, optimize=False).run(None, feed)[0]
    model, stats = _run(model)
    assert stats["folded"] == 1
    (out,) = model.graph.outputs
    assert out.name == "y" and out.producer().op_type == "Add"
    assert out.dtype == ir.DataType.FLOAT and list(out.shape) == [2, 5, 6]
    onnx.checker.check_model(to_proto(model))
    assert rel_err(make_session(model, optimize=False).run(None, feed)[0], before) <= 1e-5
