"""Calibration: ORT runs the float graph over sample inputs and collects activation statistics.

For every linear layer's input, per input channel: min, max (so abs-max) over all tokens, ignoring
±inf and NaN (attention masks hold -inf); optionally XᵀX (the Hessian proxy used by GPTQ and
sensitivity estimates) and a bounded random sample of |x| for percentile ranges.  Padded
positions never enter any statistic: when a sample carries an ``attention_mask`` (batches of
sentences padded to one length), the rows of an activation whose leading dimensions are the
mask's (batch, sequence) are kept only where the mask is non-zero.  Statistics
stream: one sample at a time, never all activations in memory.  They are attached to the IR
value as ``value.meta["lowbit.act"]``, so they follow the value through later passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lowbit.errors import CalibrationError


__all__ = ["META_KEY", "MASK_INPUT", "ActStats", "act_stats", "check_feeds", "collect_stats", "token_keep"]

logger = logging.getLogger(__name__)

META_KEY = "lowbit.act"
MASK_INPUT = "attention_mask"


def token_keep(feed: dict, x: np.ndarray) -> np.ndarray | None:
    """Rows of ``x`` that are real tokens of ``feed`` (None: all, when there is no mask or x is not per token)."""
    mask = feed.get(MASK_INPUT)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if x.ndim < 2 or x.shape[:-1] != mask.shape and int(np.prod(x.shape[:-1])) != mask.size:
        return None
    return mask.reshape(-1) != 0
_SAMPLE_CAP = 1 << 16


@dataclass
class ActStats:
    """Per-channel statistics of one activation (the last axis is the channel)."""

    cmin: np.ndarray
    cmax: np.ndarray
    count: int = 0
    xtx: np.ndarray | None = None  # [C, C] float64, sum over tokens
    sample: np.ndarray | None = None  # reservoir of |x| (float32) for percentiles
    rows: np.ndarray | None = None  # reservoir of whole token rows [n, C] (α search, sensitivity)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.cmin), np.abs(self.cmax))

    def update(self, x: np.ndarray, hessian: bool, sample: bool, rows: int = 0,
               keep: np.ndarray | None = None) -> None:
        """Add the token rows of ``x`` (last axis = channels); ``keep`` (bool, one per row) drops padding."""
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
        if keep is not None:
            x2 = x2[keep]
        if x2.shape[0] == 0:
            return
        finite = np.isfinite(x2)
        lo = np.where(finite, x2, np.inf).min(axis=0)
        hi = np.where(finite, x2, -np.inf).max(axis=0)
        self.cmin = np.minimum(self.cmin, lo)
        self.cmax = np.maximum(self.cmax, hi)
        self.count += x2.shape[0]
        if hessian:
            xf = np.where(finite, x2, 0).astype(np.float64)
            self.xtx = (0 if self.xtx is None else self.xtx) + xf.T @ xf
        if sample:
            vals = np.abs(x2[finite])
            if vals.size > _SAMPLE_CAP // 4:
                vals = self.rng.choice(vals, _SAMPLE_CAP // 4, replace=False)
            pool = vals if self.sample is None else np.concatenate([self.sample, vals])
            if pool.size > _SAMPLE_CAP:
                pool = self.rng.choice(pool, _SAMPLE_CAP, replace=False)
            self.sample = pool
        if rows:
            keep = x2[np.all(finite, axis=1)]
            if keep.shape[0] > rows:
                keep = keep[self.rng.choice(keep.shape[0], rows, replace=False)]
            pool = keep if self.rows is None else np.concatenate([self.rows, keep])
            if pool.shape[0] > rows:
                pool = pool[self.rng.choice(pool.shape[0], rows, replace=False)]
            self.rows = pool

    def scale_channels(self, s: np.ndarray) -> None:
        """The activation became x / s (per channel): update what can be updated exactly."""
        self.cmin, self.cmax = self.cmin / s, self.cmax / s
        if self.xtx is not None:
            self.xtx = self.xtx / np.outer(s, s)
        self.sample = None  # per-tensor sample cannot be rescaled per channel
        if self.rows is not None:
            self.rows = (self.rows / s).astype(np.float32)

    def tensor_range(self, percentile: float | None = None) -> tuple[float, float]:
        lo, hi = float(self.cmin.min()), float(self.cmax.max())
        if percentile is not None and self.sample is not None and self.sample.size:
            bound = float(np.percentile(self.sample, percentile))
            lo, hi = max(lo, -bound), min(hi, bound)
        return lo, hi


def act_stats(value: ir.Value) -> ActStats | None:
    return value.meta.get(META_KEY)


def check_feeds(model: ir.Model, feeds: list[dict]) -> None:
    """Refuse calibration samples that do not fit the model's inputs (name, dtype, rank)."""
    if not feeds:
        raise CalibrationError("no calibration samples", hint="pass --calibration FILE_OR_DIR with at least one sample")
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    for i, feed in enumerate(feeds):
        if not isinstance(feed, dict):
            raise CalibrationError(f"calibration sample {i} is a {type(feed).__name__}, not a dict of input arrays",
                                   hint=f"give each sample as {{input_name: array}}; the model takes {sorted(inputs)}")
        missing = [n for n in inputs if n not in feed]
        extra = [n for n in feed if n not in inputs]
        if missing or extra:
            raise CalibrationError(
                f"calibration sample {i} has inputs {sorted(feed)}, the model takes {sorted(inputs)}"
                + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""),
                hint="give samples named after the model's inputs (see 'lowbit inspect MODEL')")
        for name, arr in feed.items():
            v = inputs[name]
            arr = np.asarray(arr)
            want = v.dtype.numpy() if v.dtype is not None else None
            if want is not None and arr.dtype != want:
                raise CalibrationError(f"calibration sample {i}, input '{name}': dtype {arr.dtype}, model wants {want}")
            if v.shape is not None and arr.ndim != len(v.shape):
                raise CalibrationError(f"calibration sample {i}, input '{name}': rank {arr.ndim}, "
                                       f"model wants {len(v.shape)} (shape {v.shape})")
            if arr.size == 0 and not name.startswith("past"):  # an empty KV past is a prefill sample
                raise CalibrationError(f"calibration sample {i}, input '{name}' is empty")


def collect_stats(model: ir.Model, values: list[ir.Value], feeds: list[dict], *, hessian: bool = False,
                  sample: bool = False, rows: int = 0, progress: bool = True) -> dict[ir.Value, ActStats]:
    """Run ORT on ``feeds`` with ``values`` exposed as outputs; stream their statistics."""
    from tqdm.auto import tqdm

    from lowbit.ir.sessions import make_session

    check_feeds(model, feeds)
    names = [v.name for v in values]
    added = [v for v in values if v not in model.graph.outputs]
    model.graph.outputs.extend(added)  # expose the activations for this session only
    try:
        sess = make_session(model, optimize=False)
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    stats: dict[str, ActStats] = {}
    for i, feed in enumerate(tqdm(feeds, desc="calibrate", unit="sample", disable=not progress, leave=False)):
        try:
            outs = sess.run(names, feed)
        except Exception as exc:  # ORT rejects the sample (token id out of range, shape clash, ...)
            raise CalibrationError(f"calibration sample {i} does not run through the float model: {exc}",
                                   hint="check the sample's shapes and values (e.g. token ids < vocab size)") from exc
        for n, x in zip(names, outs):
            if n not in stats:
                c = x.shape[-1]
                stats[n] = ActStats(np.full(c, np.inf, np.float32), np.full(c, -np.inf, np.float32))
            stats[n].update(x, hessian, sample, rows, keep=token_keep(feed, x))
    return {v: stats[v.name] for v in values}
