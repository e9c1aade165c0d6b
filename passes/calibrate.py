"""Calibration pass: ORT runs the float graph over the samples; statistics annotate linear inputs.

No IR edit: every linear input value gets ``value.meta["lowbit.act"]`` (an
:class:`lowbit.quant.stats.ActStats`: per-channel min/max ignoring ±inf, optionally XᵀX and a
row sample), which smoothing, step migration, GPTQ and bit assignment read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.data.datasets import model_kind
from lowbit.errors import CalibrationError
from lowbit.ir.analysis import find_linears
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.quant.stats import META_KEY, collect_stats

__all__ = ["Calibrate", "calibration_extent", "stream_windows"]


def calibration_extent(model, feeds: list[dict]) -> dict:
    """How much data calibrated: samples (feeds), sequences (token rows) and tokens (unpadded)."""
    from lowbit.data.lm_feeds import token_input

    tok = token_input(model)
    sequences = tokens = 0
    for feed in feeds:
        ids = feed.get(tok.name) if tok is not None else None
        mask = feed.get("attention_mask")
        if ids is None:
            continue
        ids = np.asarray(ids)
        sequences += ids.shape[0] if ids.ndim > 1 else 1
        if mask is not None and np.asarray(mask).shape == ids.shape:
            tokens += int(np.asarray(mask).sum())
        else:
            tokens += int(ids.size)
    return {"samples": len(feeds), "sequences": sequences, "tokens": tokens}


def stream_windows(model, feeds: list[dict], length: int) -> list[dict]:
    """Causal-LM feeds re-cut as ``length``-token windows of their concatenated token stream.

    Each calibration sample of a text file starts a story with BOS, so position 0 always sees BOS;
    evaluation windows and prompts cut from longer text start anywhere, and a decoder's first-position
    activations (SmolLM2's massive ones) then leave ranges calibrated only on BOS.  The stream is every
    sample's unpadded tokens in order (mask 0 positions dropped); a window is at most ``length`` tokens, the
    model's context and the longest sample given; the last, shorter window is kept."""
    from lowbit.data.lm_feeds import context_length, lm_feeds, token_input

    tok = token_input(model)
    if tok is None or any(tok.name not in f for f in feeds):
        raise CalibrationError("calibrate{stream}: the calibration samples carry no token-id input to re-cut",
                               hint="stream windows are for causal LMs; drop the stream option for this model")
    length = min(length, context_length(model) or length)  # a window the graph takes whole
    ids: list[int] = []
    longest = 0
    for f in feeds:
        x = np.asarray(f[tok.name])
        mask = f.get("attention_mask")
        mask = np.asarray(mask) if mask is not None and np.asarray(mask).shape == x.shape else np.ones_like(x)
        for row, keep in zip(x.reshape(-1, x.shape[-1]), mask.reshape(-1, x.shape[-1])):
            ids.extend(int(t) for t in row[keep != 0])
            longest = max(longest, int(np.count_nonzero(keep)))
    # never longer than the longest sample given: short samples (prompts, short sentences) stay short windows,
    # only their starting points move off BOS
    length = max(1, min(length, longest))
    windows = [ids[i:i + length] for i in range(0, len(ids), length)]
    return lm_feeds(model, windows, max_len=length)


def _has_token_stream(model, feeds: list[dict]) -> bool:
    """A causal LM whose every sample feeds its token-id input (an encoder's sentences stay whole)."""
    from lowbit.data.lm_feeds import token_input

    tok = token_input(model)
    return model_kind(model) == "causal-lm" and tok is not None and all(tok.name in f for f in feeds)


@register_pass("calibrate")
class Calibrate(Pass):
    """Annotate every linear input with activation statistics from the calibration samples."""

    @dataclass(frozen=True)
    class Options:
        hessian: bool = False  # also accumulate XᵀX (GPTQ, sensitivity)
        percentiles: bool = False  # keep a sample of |x| for percentile ranges
        samples: int = 0  # use at most this many samples (0: all)
        rows: int = 0  # keep this many token rows per activation (smooth search, sensitivity)
        stream: int = 0  # causal LMs: calibrate on windows of this many tokens cut from the samples' stream (0: as given)

        def __post_init__(self):
            if self.samples < 0 or self.rows < 0 or self.stream < 0:
                raise ValueError(f"calibrate: samples, rows and stream must be >= 0, got {self.samples}, {self.rows}, "
                                 f"{self.stream}")

    @classmethod
    def may_ensure(cls):
        return (CALIBRATED, HESSIAN)

    @property
    def ensures_properties(self):
        return (CALIBRATED, HESSIAN) if self.options.hessian else (CALIBRATED,)

    def call(self, model):
        feeds = self.ctx.calibration
        if not feeds:
            raise CalibrationError("pass 'calibrate' needs calibration samples",
                                   hint="pass --calibration FILE_OR_DIR (or calibration=... in lowbit.compile)")
        if self.options.samples:
            feeds = feeds[: self.options.samples]
        if self.options.stream and _has_token_stream(model, feeds):  # else (encoders, images): samples as given
            feeds = stream_windows(model, feeds, self.options.stream)
            self.stats["stream_windows"] = len(feeds)
        values = list({lin.input: None for lin in find_linears(model.graph)})
        stats = collect_stats(model, values, feeds, hessian=self.options.hessian, sample=self.options.percentiles,
                              rows=self.options.rows, progress=self.ctx.show_progress)
        for v, st in stats.items():
            if not np.all(np.isfinite(st.cmin)) or not np.all(np.isfinite(st.cmax)):
                bad = int(np.sum(~np.isfinite(st.cmax)))
                raise CalibrationError(f"activation '{v.name}' has {bad} channels with no finite value in any sample",
                                       hint="check the calibration data and the model's weights for NaN/Inf")
            v.meta[META_KEY] = st
        self.stats["activations"] = len(stats)
        self.stats["samples"] = len(feeds)
        self.ctx.report["calibration"] = calibration_extent(model, feeds)
        return PassResult(model, modified=False)
