"""The Relax pipeline lowbit compiles with: TVM's per-target default, plus tuning records and a
dlight step that survives rule failures.

It is TVM's own default (library dispatch → legalize/fold/fuse → dataflow lowering → memory
planning) with two changes between fusion and lowering:

* ``MetaScheduleApplyDatabase`` when tuning records are given (the workloads match because
  :func:`lowbit.backends.tvm_tune.tune` tunes the module after the same fusion passes);
* on GPUs, dlight's default rules applied one PrimFunc at a time, falling back to the
  ``Fallback`` rule where a rule raises: TVM 0.27's GEMV rule asserts on a reduction of extent 1
  (attention's probs @ V for a single token), which would otherwise fail the whole build.
"""

from __future__ import annotations

import logging
import os

__all__ = ["lowbit_pipeline"]

logger = logging.getLogger(__name__)


def _robust_dlight(target):
    import tvm
    from tvm.s_tir import dlight as dl

    rules = lambda: (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),  # noqa: E731
                     dl.gpu.Fallback())

    @tvm.transform.module_pass(opt_level=0, name="LowbitDlight")
    def apply(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get("tir.is_scheduled")):
                continue
            single = tvm.IRModule({gv: func})
            try:
                with target:
                    out = dl.ApplyDefaultSchedule(*rules())(single)
            except Exception as exc:  # noqa: BLE001 - a dlight rule bug: use the fallback schedule
                logger.debug("dlight failed on %s (%s); using Fallback", gv.name_hint, exc)
                with target:
                    out = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(single)
            mod[gv] = out[gv]
        return mod

    return apply


def lowbit_pipeline(target, tuning_db: str | os.PathLike | None = None):
    """A module pass compiling a Relax module for ``target`` (see the module docstring)."""
    import tvm
    from tvm import relax

    cuda = target.kind.name == "cuda"
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as gpu

    backend = gpu if cuda else cpu

    @tvm.transform.module_pass(opt_level=0, name="LowbitPipeline")
    def pipeline(mod, _ctx):
        passes = list(backend.library_dispatch_passes(target)) + [
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]
        if tuning_db is not None:
            passes.append(relax.transform.MetaScheduleApplyDatabase(str(tuning_db)))
        if cuda:
            passes.append(_robust_dlight(target))
        passes += list(backend.dataflow_lower_passes(target)) + list(backend.finalize_passes(target))
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
