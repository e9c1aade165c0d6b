"""quantize-weights: numpy quantizer maths, GPTQ beats RTN on its own objective, graph form, overrides."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.quant.gptq import dequantize, gptq_quantize, rtn_quantize
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.ir.sessions import make_session
from lowbit_models import random_llama, rel_err, tokens
from rtn_reference import rtn_reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_codes_in_range_and_error_bounded(bits, group, symmetric):
    w = np.random.default_rng(bits).standard_normal((100, 24)).astype(np.float32)
    q, s, z = rtn_quantize(w, bits, group, symmetric)
    assert q.max() < 2 ** bits and s.shape == z.shape == ((1 if group == 0 else 4), 24)
    w_hat = dequantize(q, s, z, group)
    g = 100 if group == 0 else group
    s_rows = s[np.arange(100) // g]
    # round to nearest: within half a step, except the clipped top code of a symmetric grid
    assert np.all(np.abs(w_hat - w) <= s_rows.__abs__() * (0.5 + (1.0 if symmetric else 0)) + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_is_the_min_max_formula(bits, group, symmetric):
    """rtn_quantize → dequantize equals the loop-by-loop reference (tests/rtn_reference.py) exactly."""
    w = np.random.default_rng(bits + group).standard_normal((100, 9)).astype(np.float32)
    w[:, 0], w[:, 1], w[:, 2] = np.abs(w[:, 0]) + 0.1, 0.0, -np.abs(w[:, 2])  # all ≥ 0, all zero, all ≤ 0
    w[5, 3] = -w[:, 3].__abs__().max() * 1.5  # the largest magnitude negative: the symmetric grid's sign rule
    got = dequantize(*rtn_quantize(w, bits, group, symmetric), group)
    np.testing.assert_array_equal(got, rtn_reference(w, bits, group, symmetric, np.float64))


def test_clip_search_never_worse():
    w = np.random.default_rng(0).standard_t(3, (256, 64)).astype(np.float32)  # heavy tails
    for bits in (2, 3, 4):
        plain = dequantize(*rtn_quantize(w, bits, 32, False, False), 32)
        clipped = dequantize(*rtn_quantize(w, bits, 32, False, True), 32)
        assert np.sum((clipped - w) ** 2) <= np.sum((plain - w) ** 2)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [0, 32])
def test_gptq_lowers_output_error(act_order, group):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2048, 96)) @ rng.standard_normal((96, 96))  # correlated inputs
    w = rng.standard_normal((96, 40)).astype(np.float32)
    h = x.T @ x
    rtn = dequantize(*rtn_quantize(w, 3, group), group)
    gq = dequantize(*gptq_quantize(w, h, 3, group, act_order=act_order), group)
    err = lambda wh: float(np.sum((x @ (wh - w)) ** 2))  # noqa: E731
    assert err(gq) < 0.8 * err(rtn)


def _quantize(model, pipeline, feeds=None):
    ctx = CompileContext(calibration=feeds, show_progress=False)
    return PassManager.from_pipeline(pipeline, ctx).run(model)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_graph_runs_and_matches_numpy_dequantized_weights(bits, symmetric):
    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    feed = tokens(128, seq=12)
    from lowbit.ir.analysis import find_linears

    weights = {lin.name: lin.weight.const_value.numpy().copy() for lin in find_linears(model.graph)}
    qmodel = _quantize(model, f"quantize-weights{{bits={bits},group=32,symmetric={str(symmetric).lower()}}}")
    ops = {n.op_type for n in qmodel.graph}
    assert ("MatMul3Bit" in ops) == (bits == 3)
    # the same model with numpy RTN-dequantized float weights gives the same logits
    ref = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    for lin in find_linears(ref.graph):
        w = weights[lin.name]
        group = 32 if w.shape[0] > 32 else 0
        lin.weight.const_value = __import__("onnx_ir").tensor(rtn_reference(w, bits, group, symmetric, np.float64))
    got = make_session(qmodel, optimize=False).run(None, feed)[0]
    want = make_session(ref, optimize=False).run(None, feed)[0]
    assert rel_err(got, want) < 1e-5


def test_metadata_overrides_bits_and_keeps_float():
    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    from lowbit.ir.analysis import find_linears

    lins = {lin.name: lin for lin in find_linears(model.graph)}
    lins["layers.0.mlp.down_proj"].node.metadata_props["lowbit.bits"] = "16"
    lins["layers.0.attn.q_proj"].node.metadata_props["lowbit.bits"] = "3"
    lins["layers.0.attn.q_proj"].node.metadata_props["lowbit.group"] = "64"
    q = _quantize(model, "quantize-weights{bits=4,group=32}")
    three = [n for n in q.graph if n.op_type == "MatMul3Bit"]
    assert len(three) == 1 and three[0].attributes.get_int("block_size") == 64
    remaining = {lin.name for lin in find_linears(q.graph)}
    assert "layers.0.mlp.down_proj" in remaining  # still a float MatMul


def test_gptq_without_hessian_refuses():
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="hessian=true"):
        _quantize(random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128),
                  "quantize-weights{method=gptq}")


def test_gptq_pass_beats_rtn_on_logits():
    model_args = dict(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    feeds = [tokens(128, batch=1, seq=64, seed=i) for i in range(8)]
    probe = tokens(128, batch=2, seq=32, seed=99)
    ref = make_session(random_llama(**model_args), optimize=False).run(None, probe)[0]
    errs = {}
    for method in ("rtn", "gptq"):
        m = _quantize(random_llama(**model_args),
                      f"calibrate{{hessian=true}},quantize-weights{{bits=3,group=32,method={method}}}", feeds)
        errs[method] = rel_err(make_session(m).run(None, probe)[0], ref)
    assert errs["gptq"] < errs["rtn"]


def test_the_ray_path_assembles_what_the_local_path_computes():
    """quantize-weights{ray=...} maps the per-layer jobs (lowbit.quant.parallel.map_tasks) and then rebuilds
    (weight, effective group, codes) per layer; here the map runs in this process (ray="", no cluster:
    test_ray runs the real one, slow) and the assembly must equal the local per-layer path, incl. a group
    longer than K (effective group 0: per channel)."""
    from lowbit.ir.analysis import find_linears

    model = random_llama(dim=64, hidden=172, layers=1, heads=4, kv=2, vocab=128)
    pm = PassManager.from_pipeline("quantize-weights{bits=4,group=128}", CompileContext(show_progress=False))
    p = pm.passes[0]
    todo = [(lin, (4, 128)) for lin in find_linears(model.graph)]
    assert any(lin.shape[0] <= 128 for lin, _ in todo) and any(lin.shape[0] > 128 for lin, _ in todo)
    assembled = p._parallel(todo)
    for lin, (bits, group) in todo:
        w, g, arrays = assembled[lin.name]
        w_l, g_l, arrays_l = p._quantize(lin, bits, group, None)
        assert g == g_l == (0 if lin.shape[0] <= 128 else 128), lin.name
        np.testing.assert_array_equal(w, w_l)
        for a, b in zip(arrays, arrays_l):
            np.testing.assert_array_equal(a, b)
