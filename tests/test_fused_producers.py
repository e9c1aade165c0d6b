"""Fused producers (Phi-3's gate_up_proj and qkv_proj): a scale on the down-projection's input folds into the
up half's columns of the fused linear alone, through the Split/Slice that cuts it.

Expected columns come from the construction (up = columns F..2F of the fused matrix), not from the code;
smoothing must leave the float output unchanged and the gate columns untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from lowbit.ir.analysis import GroupKind, Via, find_groups
from lowbit.ir.graph_builder import GraphBuilder
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager

D, F, T = 16, 24, 10


def _mlp(cut: str, overlap: bool = False):
    rng = np.random.default_rng(0)
    g = GraphBuilder(opset=21)
    x = g.input("x", TensorProto.FLOAT, [1, T, D])
    g.output("y", TensorProto.FLOAT, [1, T, D])
    w_gu = rng.standard_normal((D, 2 * F)).astype(np.float32)
    w_gu[:, F + 3] *= 8  # an outlier up channel, for smoothing to act on
    fused = g.op("MatMul", [x, g.init("mlp.gate_up_proj.weight", w_gu)])
    if cut == "split":
        gate, up = g.op("Split", [fused], outputs=2, axis=-1, num_outputs=2)
    else:
        def sl(lo, hi):
            return g.op("Slice", [fused, g.const([lo]), g.const([hi]), g.const([-1]), g.const([1])])
        gate, up = sl(0, F + (2 if overlap else 0)), sl(F, 2 * F)
        if overlap:  # the gate slice reaches into the up columns: scaling them would change the gate
            gate = g.op("Slice", [gate, g.const([0]), g.const([F]), g.const([-1]), g.const([1])])
    h = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    g.op("MatMul", [h, g.init("mlp.down_proj.weight", rng.standard_normal((F, D)).astype(np.float32))], out="y")
    return g.build("fused-mlp"), w_gu


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_down_projection_groups_with_the_up_half_of_the_fused_linear(cut):
    model, _ = _mlp(cut)
    down = [grp for grp in find_groups(model.graph) if grp.consumers[0].name.endswith("down_proj")]
    assert len(down) == 1 and down[0].kind is GroupKind.LINEAR and down[0].via is Via.GATED
    np.testing.assert_array_equal(down[0].channel_map, np.arange(F, 2 * F))


def test_overlapping_slices_are_not_folded_into():
    model, _ = _mlp("slice", overlap=True)
    down = [grp for grp in find_groups(model.graph) if grp.consumers[0].name.endswith("down_proj")]
    assert down[0].kind is GroupKind.NONE


@pytest.mark.parametrize("cut", ["split", "slice"])
@pytest.mark.parametrize("pipeline", ["calibrate,smooth{alpha=0.5}", "calibrate{rows=512},awq"])
def test_smoothing_through_the_cut_is_float_equivalent_and_scales_only_up_columns(cut, pipeline):
    model, w_gu = _mlp(cut)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, T, D)).astype(np.float32)} for i in range(4)]
    ref = make_session(model).run(None, feeds[0])[0]
    pm = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False, calibration=feeds))
    out = pm.run(model)
    np.testing.assert_allclose(make_session(out).run(None, feeds[0])[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    w = next(v for v in out.graph.initializers.values() if v.name.startswith("mlp.gate_up_proj")).const_value.numpy()
    np.testing.assert_array_equal(w[:, :F], w_gu[:, :F])  # the gate half is untouched
    assert not np.allclose(w[:, F:], w_gu[:, F:])  # the up half took 1/s
