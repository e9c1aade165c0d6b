"""Smoothing fusion (SmoothQuant).  X·W = (X·diag(s)⁻¹)·(diag(s)·W).

Per input channel j of a group of linears reading one activation X:
``s_j = max|X_j|^α / max_consumers max|W_j,:|^(1−α)``.  ``diag(s)`` multiplies the weight rows of
every consumer; ``diag(s)⁻¹`` folds into the producer: a norm's γ (and β), or a previous linear's
output columns and bias (SwiGLU up-projection for the down-projection; V for O, where with GQA
every O channel of one KV head shares the V channel's scale).  No Mul node is left behind, and
float outputs are unchanged up to rounding.  Groups without a foldable producer are skipped;
the report lists every linear left unsmoothed with the reason (``report["smooth"]["unsmoothed"]``).

``search=true`` picks α per group from a grid, or no smoothing, by the W8A8 output error on
calibration rows (needs ``calibrate{rows=N}``).  Where the rows are a small sample of many more
calibration tokens, the scales and the range come from all of them and the error is measured on
the rows.  Where the rows are most of the calibration tokens (a few short prefills), that in-sample
error misleads: s = f(max|X_j|) makes every channel reach the edge of the calibrated range, so
activations the static quantizer has not seen clip there — on the conformance Gemma-3 (96
calibration tokens) the in-sample search gave 0.13 relative logits error, no smoothing 0.04.
There the error is measured two-fold: scales and range from one half of the rows, the error on
the other half, and back.  A group that no α improves is left unsmoothed, with that reason in
the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lowbit.ir.analysis import Group, find_groups
from lowbit.quant.stats import act_stats
from lowbit.passmanager.manager import CALIBRATED, Pass, PassResult, register_pass
from lowbit.quant.channel_scales import consumer_scales, fold_channel_scales

__all__ = ["Smooth", "held_out_error", "smoothing_scales"]

_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Fewer calibration rows than this and the searched α fits the samples, not the model (36 rows of a
# tiny Llama: searched 0.13-0.28 relative output error on unseen feeds, fixed α=0.5 0.07-0.13), so
# the search keeps the configured α.
MIN_SEARCH_ROWS = 64  # the same floor below which calibration is warned to be too small


def smoothing_scales(x_absmax: np.ndarray, w_rowmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = |X|^α / |W|^(1−α), with 1 where a channel is all zero; clipped to [1e-4, 1e4]."""
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_rowmax, np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4)


def _fake_quant_error(rows: np.ndarray, weights: list[np.ndarray], s: np.ndarray,
                      range_rows: np.ndarray | None = None, refs: list[np.ndarray] | None = None) -> float:
    """Output error on ``rows`` of static per-tensor u8 activations (range from ``range_rows``, default
    ``rows``) × per-channel int8 weights after smoothing, in the dtype of ``rows`` and ``weights``
    (the search passes float32; the sum of squares is accumulated in float64).  ``refs``: the float
    outputs ``rows @ w`` of every weight, which do not depend on ``s`` (the α search computes them once
    per group instead of once per candidate); computed here when not given."""
    dtype = np.result_type(rows, *weights)
    s = np.asarray(s, dtype)
    x = rows / s
    ranged = x if range_rows is None else range_rows / s
    lo, hi = min(float(ranged.min()), 0.0), max(float(ranged.max()), 0.0)
    step = (hi - lo) / 255 or 1.0
    zp = float(np.round(-lo / step))
    xq = ((np.clip(np.round(x / step) + zp, 0, 255) - zp) * step).astype(dtype, copy=False)
    err = 0.0
    for i, w in enumerate(weights):
        wq = w * s[:, None]  # diag(s)·W, fake-quantized in place (the head's is 28 M weights on SmolLM2)
        sw = np.abs(wq).max(axis=0) / 127
        sw[sw == 0] = 1
        wq /= sw
        np.round(wq, out=wq)
        np.clip(wq, -127, 127, out=wq)
        wq *= sw
        d = xq @ wq
        d -= rows @ w if refs is None else refs[i]
        err += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return err


def held_out_error(rows: np.ndarray, weights: list[np.ndarray], scales: Callable[[np.ndarray], np.ndarray],
                   refs: list[np.ndarray] | None = None) -> float:
    """Two-fold W8A8 error: smoothing scales (``scales(per-channel max|X|)``) and the activation range from the
    even rows, the error on the odd ones, and back.  ``refs``: ``rows @ w`` per weight, as in
    :func:`_fake_quant_error`."""
    err = 0.0
    for fit, test in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        s = scales(np.abs(rows[fit]).max(axis=0))
        err += _fake_quant_error(rows[test], weights, s, rows[fit],
                                 None if refs is None else [r[test] for r in refs])
    return err


@register_pass("smooth")
class Smooth(Pass):
    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5
        search: bool = False
        norms: bool = True  # fold into norm producers
        linears: bool = True  # fold into previous linears (up→down, V→O)

        def __post_init__(self):
            if not 0 < self.alpha < 1:
                raise ValueError(f"smooth: alpha must be in (0, 1), got {self.alpha}")

    requires_properties = (CALIBRATED,)
    float_equivalent = True

    def _scales(self, group: Group, alpha: float, xmax: np.ndarray | None = None) -> np.ndarray:
        """One scale per producer channel from the activation's per-channel max|X| (default: calibration's)."""
        weights = [c.weight.const_value.numpy() for c in group.consumers]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        xmax = act_stats(group.activation).absmax if xmax is None else xmax
        if group.kind == "linear":  # one scale per producer channel
            n = group.producer_linear.shape[1]
            px, pw = np.zeros(n), np.zeros(n)
            np.maximum.at(px, group.channel_map, xmax)
            np.maximum.at(pw, group.channel_map, wmax)
            return smoothing_scales(px, pw, alpha)
        return smoothing_scales(xmax, wmax, alpha)

    def _choose_alpha(self, group: Group) -> float | None:
        """The configured α, or with ``search`` the grid's α (None: no smoothing) of least held-out error."""
        stats = act_stats(group.activation)
        if not self.options.search or stats.rows is None:
            return self.options.alpha
        if stats.rows.shape[0] < MIN_SEARCH_ROWS:
            self.stats["alpha_search_skipped"] += 1  # too few rows to choose α without overfitting them
            return self.options.alpha
        # float32 products, and the float outputs rows @ w once per group rather than once per candidate α:
        # the search was half of a SmolLM2 w8a8 compile in float64 (benchmarks/SMOLLM2_RESULTS.md)
        rows = stats.rows.astype(np.float32)
        weights = [c.weight.const_value.numpy().astype(np.float32) for c in group.consumers]
        refs = [rows @ w for w in weights]
        if 2 * rows.shape[0] <= stats.count:  # rows sampled from ≥ 2× as many tokens: scales from all of them
            error = lambda a: _fake_quant_error(  # noqa: E731
                rows, weights, np.ones(rows.shape[1]) if a is None else consumer_scales(group, self._scales(group, a)),
                refs=refs)
        else:
            self.stats["alpha_search_held_out"] += 1
            error = lambda a: held_out_error(  # noqa: E731
                rows, weights, np.ones_like if a is None else
                (lambda xmax: consumer_scales(group, self._scales(group, a, xmax))), refs=refs)
        errs = {a: error(a) for a in (None, *_GRID)}  # None first: a tie keeps the model as is
        return min(errs, key=errs.get)

    def call(self, model):
        graph = model.graph
        if self.options.search and not any(
                (st := act_stats(v)) is not None and st.rows is not None for v in
                {g.activation for g in find_groups(graph)}):
            self.fail("search=true needs calibration rows", hint="run calibrate{rows=512} before smooth")
        alphas, unsmoothed = [], []

        def skip(group: Group, reason: str) -> None:
            self.stats["skipped"] += 1
            unsmoothed.extend({"layer": c.name, "reason": reason} for c in group.consumers)

        for group in find_groups(graph):
            if group.kind == "none":
                skip(group, f"no foldable producer: {group.reason}")
                continue
            if act_stats(group.activation) is None:
                skip(group, "no calibration statistics for its input")
                continue
            if (group.kind == "norm" and not self.options.norms) or (group.kind == "linear" and not self.options.linears):
                skip(group, f"smooth{{{'norms' if group.kind == 'norm' else 'linears'}=false}}")
                continue
            alpha = self._choose_alpha(group)
            if alpha is None:
                self.stats["alpha_search_unsmoothed"] += 1
                skip(group, "no α lowers its held-out W8A8 error (smooth{search=true})")
                continue
            alphas.append(alpha)
            s = self._scales(group, alpha)
            fold_channel_scales(graph, group, s, self.fail)
            self.stats[f"groups_{group.kind}"] += 1
        report = self.ctx.report.setdefault("smooth", {})
        if alphas:
            report["alpha"] = {"mean": float(np.mean(alphas)), "min": min(alphas), "max": max(alphas)}
        report["unsmoothed"] = unsmoothed  # every linear left unsmoothed, with its reason
        return PassResult(model, modified=bool(alphas))
