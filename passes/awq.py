"""Activation-aware weight scaling (AWQ, Lin et al. 2024).  X·W = (X·diag(s)⁻¹)·(diag(s)·W).

Weight-only quantization errs the same on every input channel, but channels with large
activations matter more; scaling those weight rows up before quantizing protects them.  Per
group of linears reading one activation X (the same groups as ``smooth``), AWQ searches

    s = mean|X|^α  (normalised so that √(max s · min s) = 1),   α ∈ {0, 1/n, …, 1}

for the α minimising ``Σ_consumers ‖X·W − (X·diag(s)⁻¹)·Q(diag(s)·W)‖²`` over calibration rows,
where Q is the weight quantizer that will follow (round-to-nearest at ``bits``/``group``,
``symmetric`` as given).  α = 0 (s = 1) is in the grid, so the chosen scaling never raises the
searched error.  ``diag(s)⁻¹`` folds into X's producer (a norm's γ/β, or the previous linear's
output columns: up→down, V→O) exactly as smoothing folds, so float outputs are unchanged and no
node is added.  Composed with rotation: run it after ``rotate`` (the rotated activations have
few outliers, AWQ then protects what is left).  Needs ``calibrate{rows=N}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.ir.analysis import Group, find_groups
from lowbit.passmanager.manager import CALIBRATED, Pass, PassResult, register_pass
from lowbit.quant.gptq import dequantize, rtn_quantize
from lowbit.quant.channel_scales import consumer_scales, fold_channel_scales
from lowbit.quant.stats import act_stats

__all__ = ["Awq", "awq_error"]


def awq_error(rows: np.ndarray, weights: list[np.ndarray], s: np.ndarray, bits: int, group: int,
              symmetric: bool) -> float:
    """``Σ ‖X·W − (X/s)·Q(diag(s)·W)‖²`` over ``rows`` (the searched objective)."""
    err = 0.0
    xs = rows / s
    for w in weights:
        g = 0 if group >= w.shape[0] else group
        wq = dequantize(*rtn_quantize(w * s[:, None], bits, g, symmetric), g)
        err += float(np.sum((rows @ w - xs @ wq) ** 2))
    return err


@register_pass("awq")
class Awq(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        group: int = 128
        symmetric: bool = False
        grid: int = 20

        def __post_init__(self):
            if self.bits not in (2, 3, 4, 8):
                raise ValueError(f"awq: bits must be 2, 3, 4 or 8, got {self.bits}")
            if self.group < 0 or self.grid < 1:
                raise ValueError(f"awq: group must be >= 0 and grid >= 1, got {self.group}, {self.grid}")

    requires_properties = (CALIBRATED,)
    float_equivalent = True

    def _search(self, group: Group) -> np.ndarray | None:
        st = act_stats(group.activation)
        rows = st.rows.astype(np.float64)
        weights = [c.weight.const_value.numpy().astype(np.float64) for c in group.consumers]
        mean = np.abs(rows).mean(axis=0)
        if group.kind == "linear":  # one scale per producer channel (GQA: O channels share their V channel)
            n = group.producer_linear.shape[1]
            pm = np.zeros(n)
            np.maximum.at(pm, group.channel_map, mean)
            mean = pm
        mapped = np.zeros(mean.shape[0], bool)  # a fused producer (qkv, gate_up): only the consumer's columns
        mapped[group.channel_map if group.kind == "linear" else slice(None)] = True
        mean = np.where(mapped, np.maximum(mean, 1e-8), 1.0)
        o = self.options
        best, best_err = None, awq_error(rows, weights, np.ones(rows.shape[1]), o.bits, o.group, o.symmetric)
        for i in range(1, o.grid + 1):
            s = mean ** (i / o.grid)
            s = np.where(mapped, s / np.sqrt(s[mapped].max() * s[mapped].min()), 1.0)
            sc = consumer_scales(group, s)
            err = awq_error(rows, weights, sc, o.bits, o.group, o.symmetric)
            if err < best_err:
                best, best_err = s, err
        return best

    def call(self, model):
        graph = model.graph
        groups = [g for g in find_groups(graph) if g.kind != "none" and act_stats(g.activation) is not None]
        if groups and all(act_stats(g.activation).rows is None for g in groups):
            self.fail("awq needs calibration rows", hint="run calibrate{rows=512} before awq")
        for group in groups:
            s = self._search(group)
            if s is None:
                self.stats["unscaled"] += 1
                continue
            fold_channel_scales(graph, group, s, self.fail)
            self.stats[f"scaled_{group.kind}"] += 1
        return PassResult(model, modified=any(k.startswith("scaled") for k in self.stats))
