"""Calibration pass: ORT runs the float graph over the samples; statistics annotate linear inputs.

No IR edit: every linear input value gets ``value.meta["lowbit.act"]`` (an
:class:`lowbit.quant.stats.ActStats`: per-channel min/max ignoring ±inf, optionally XᵀX and a
row sample), which smoothing, step migration, GPTQ and bit assignment read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import CalibrationError
from lowbit.ir.analysis import find_linears
from lowbit.passmanager.manager import CALIBRATED, HESSIAN, Pass, PassResult, register_pass
from lowbit.quant.stats import META_KEY, collect_stats

__all__ = ["Calibrate"]


@register_pass("calibrate")
class Calibrate(Pass):
    """Annotate every linear input with activation statistics from the calibration samples."""

    @dataclass(frozen=True)
    class Options:
        hessian: bool = False  # also accumulate XᵀX (GPTQ, sensitivity)
        percentiles: bool = False  # keep a sample of |x| for percentile ranges
        samples: int = 0  # use at most this many samples (0: all)
        rows: int = 0  # keep this many token rows per activation (smooth search, sensitivity)

        def __post_init__(self):
            if self.samples < 0 or self.rows < 0:
                raise ValueError(f"calibrate: samples and rows must be >= 0, got {self.samples}, {self.rows}")

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
        return PassResult(model, modified=False)
