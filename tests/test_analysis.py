"""Graph analysis: linears, producers, groups, GQA channel maps."""

from __future__ import annotations

import numpy as np

from lowbit.ir.analysis import find_groups, find_linears


def test_stories260k_groups(stories_model):
    linears = find_linears(stories_model.graph)
    assert len(linears) == 5 * 7 + 1  # q k v o gate up down per layer, and the head
    groups = find_groups(stories_model.graph, linears)
    kinds = {tuple(c.name.split(".")[-1] for c in g.consumers): g.kind for g in groups}
    assert kinds[("q_proj", "k_proj", "v_proj")] == "norm"
    assert kinds[("gate_proj", "up_proj")] == "norm"
    assert kinds[("o_proj",)] == "linear"
    assert kinds[("down_proj",)] == "linear"
    assert kinds[("lm_head",)] == "norm"
    down = next(g for g in groups if g.consumers[0].name == "layers.0.mlp.down_proj")
    assert down.producer_linear.name == "layers.0.mlp.up_proj"  # not the gate: silu(gate) is not linear
    o = next(g for g in groups if g.consumers[0].name == "layers.0.attn.o_proj")
    assert o.producer_linear.name == "layers.0.attn.v_proj"
    # GQA: 8 query heads share 4 KV heads of 8 dims; O channel c reads V channel (c // 8 // 2) * 8 + c % 8
    c = np.arange(64)
    np.testing.assert_array_equal(o.channel_map, (c // 16) * 8 + c % 8)


def test_minilm_post_norm_groups_are_not_foldable_into_layernorm(minilm_model):
    groups = find_groups(minilm_model.graph)
    by_kind = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    # post-norm BERT: every LayerNorm output also feeds the residual add
    assert "norm" not in by_kind
    assert len(by_kind["linear"]) == 6  # V→O in each of the 6 layers, identity map (no GQA)
    for g in by_kind["linear"]:
        np.testing.assert_array_equal(g.channel_map, np.arange(384))
    assert sum(len(g.consumers) for g in groups) == 36
