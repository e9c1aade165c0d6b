"""awq: the searched per-channel scales equal a numpy AWQ search written from the paper; float
outputs unchanged; the searched objective never rises."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.analysis import find_groups, find_linears
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.stats import act_stats
from lowbit_models import logits, random_llama, rel_err, tokens

BITS, GROUP, GRID = 3, 32, 10


def _rtn_asym(w, bits, group):
    """Asymmetric min/max round-to-nearest per (group of rows, column), 0 kept in range."""
    out = np.empty_like(w)
    for r in range(0, w.shape[0], group):
        blk = w[r:r + group]
        lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
        s = (hi - lo) / (2 ** bits - 1)
        s[s == 0] = 1
        z = np.clip(np.round(-lo / s), 0, 2 ** bits - 1)
        out[r:r + group] = (np.clip(np.round(blk / s) + z, 0, 2 ** bits - 1) - z) * s
    return out


def _expected_scale(rows, weights, cmap, grid=GRID):
    mean = np.abs(rows).mean(0)
    if cmap is not None:
        pm = np.zeros(cmap.max() + 1)
        np.maximum.at(pm, cmap, mean)
        mean = pm
    mean = np.maximum(mean, 1e-8)

    def loss(s):
        sc = s if cmap is None else s[cmap]
        return sum(np.sum((rows @ w - (rows / sc) @ _rtn_asym(w * sc[:, None], BITS, GROUP)) ** 2) for w in weights)

    best, best_loss = np.ones_like(mean), loss(np.ones_like(mean))
    for i in range(1, grid + 1):
        s = mean ** (i / grid)
        s = s / np.sqrt(s.max() * s.min())
        if (cur := loss(s)) < best_loss:
            best, best_loss = s, cur
    return best if cmap is None else best[cmap]


def test_awq_scales_match_reference_and_keep_float_outputs():
    feeds = [tokens(128, batch=1, seq=32, seed=i) for i in range(4)]
    make = lambda: random_llama(dim=64, hidden=96, layers=2, heads=4, kv=2, vocab=128)  # noqa: E731
    ref = PassManager.from_pipeline("calibrate{rows=256}",
                                    CompileContext(calibration=feeds, show_progress=False)).run(make())
    expected = {}
    for g in find_groups(ref.graph):
        if g.kind == "none":
            continue
        ws = [c.weight.const_value.numpy().astype(np.float64) for c in g.consumers]
        s = _expected_scale(act_stats(g.activation).rows.astype(np.float64), ws,
                            g.channel_map if g.kind == "linear" else None)
        for c, w in zip(g.consumers, ws):
            expected[c.name] = (w, s)
    probe = tokens(128, batch=2, seq=16, seed=99)
    before = logits(make(), probe)
    ctx = CompileContext(calibration=feeds, show_progress=False)
    pipe = f"calibrate{{rows=256}},awq{{bits={BITS},group={GROUP},grid={GRID}}}"
    out = PassManager.from_pipeline(pipe, ctx).run(make())
    assert rel_err(logits(out, probe), before) < 1e-4
    scaled = 0
    for lin in find_linears(out.graph):
        if lin.name not in expected:
            continue
        w0, s = expected[lin.name]
        w1 = lin.weight.const_value.numpy().astype(np.float64)
        ratio = w1 / np.where(w0 == 0, 1, w0)
        # rows scaled by s (a linear that also produces a group's input has its columns divided too)
        col_fix = np.median(ratio / s[:, None], axis=0)
        np.testing.assert_allclose(ratio, s[:, None] * col_fix[None, :], rtol=1e-4)
        scaled += not np.allclose(s, 1)
    assert scaled > 0


def _mirrored_llama(spread=400.0):
    """A random Llama whose norm γ spans ``spread`` (log-spaced, shuffled) and whose q/k/v and gate/up weight rows
    are divided by the same γ: the float model is a unit-γ Llama, but channel j's activation is ∝ γ_j and its weight
    row ∝ 1/γ_j.  AWQ's scale s = mean|X|^α then makes diag(s)·W flat exactly at α = 1, and the error
    (max/min γ)^(2(1−α)) of a group shrinks all the way to α = 1: the top of the grid is the optimum."""
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights

    cfg = LlamaConfig(64, 96, 1, 4, 2, 128, 128)
    w = random_llama_weights(cfg, 3)
    rng = np.random.default_rng(4)
    for norm, lins in (("attn_norm", ("q", "k", "v")), ("ffn_norm", ("w1", "w3"))):
        g = rng.permutation(np.geomspace(1.0, spread, cfg.dim)).astype(np.float32)
        w[norm][0] = g
        for k in lins:
            w[k][0] = w[k][0] / g[None, :]
    return build_llama(cfg, w)


@pytest.mark.parametrize("grid", [1, 4])
def test_awq_takes_the_top_of_its_grid_when_that_is_the_optimum(grid):
    """α = 1 belongs to AWQ's grid {0, 1/n, …, 1}: on a model built so that α = 1 is the optimum (above), the
    searched scales equal mean|X|¹ (normalised) — the numpy search from the paper picks α = 1 too, and a search
    that stops one short of the top (α ≤ (n−1)/n) picks other scales."""
    feeds = [tokens(128, batch=1, seq=32, seed=i) for i in range(4)]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    ref = PassManager.from_pipeline("calibrate{rows=256}", ctx).run(_mirrored_llama())
    expected = {}
    for g in find_groups(ref.graph):
        if g.kind != "norm":
            continue
        rows = act_stats(g.activation).rows.astype(np.float64)
        ws = [c.weight.const_value.numpy().astype(np.float64) for c in g.consumers]
        s = _expected_scale(rows, ws, None, grid)
        top = np.maximum(np.abs(rows).mean(0), 1e-8)
        top = top / np.sqrt(top.max() * top.min())
        if len(g.consumers) > 1:  # the two built groups: the reference's optimum is the top of the grid
            np.testing.assert_allclose(s, top, rtol=1e-12)
        for c, w in zip(g.consumers, ws):
            expected[c.name] = (w, s)
    ctx = CompileContext(calibration=feeds, show_progress=False)
    out = PassManager.from_pipeline(f"calibrate{{rows=256}},awq{{bits={BITS},group={GROUP},grid={grid}}}",
                                    ctx).run(_mirrored_llama())
    seen = 0
    for lin in find_linears(out.graph):
        if lin.name in expected:
            w0, s = expected[lin.name]
            ratio = lin.weight.const_value.numpy().astype(np.float64) / w0
            col_fix = np.median(ratio / s[:, None], axis=0)  # v_proj's columns also carry the V→O group's 1/s
            np.testing.assert_allclose(ratio, s[:, None] * col_fix[None, :], rtol=1e-4, err_msg=lin.name)
            seen += 1
    assert seen == 6  # q, k, v, gate, up (α = 1 by construction) and lm_head (the reference's choice)


def test_awq_searches_with_the_weight_quantizer_that_follows_by_default():
    """``awq,quantize-weights`` with both at their defaults: the search's Q has the width and group the weights
    are then quantized at (a search at another group optimises the wrong quantizer)."""
    from lowbit.passes.awq import Awq
    from lowbit.passes.quantize_weights import QuantizeWeights

    a, q = Awq.Options(), QuantizeWeights.Options()
    assert (a.bits, a.group) == (q.bits, q.group)
