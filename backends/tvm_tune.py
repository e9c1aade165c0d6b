"""Meta-schedule tuning records for the TVM backend (``lowbit tune``).

    tune(model, target="llvm", trials=64, out_dir="tuning/llama", shape_dict={"tokens": [1, 1]})
    lower_tvm(model, target, out, shape_dict=..., tuning_db="tuning/llama")   # applies them

Tuning runs on the module exactly as compilation sees it (import, then the ``zero`` pipeline:
legalize, fold, fuse), so the records' workloads match at compile time, where
``MetaScheduleApplyDatabase`` replaces each fused PrimFunc that has a record; the others keep the
default schedule.  lowbit's hand-scheduled kernels (``tir.is_scheduled``) are never tuned.
The records are two JSON-lines files (``database_workload.json``, ``database_tuning_record.json``)
that can be shipped beside a model.  On 2 cores pass ``--max-workers 1`` (TOOLCHAIN.md).

CLI (wired by the main branch as ``lowbit tune``)::

    python -m lowbit.backends.tvm_tune MODEL.onnx --out tuning/ --trials 64 --shape tokens=1x1 [--target llvm]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["tune", "tune_main"]

logger = logging.getLogger(__name__)


def tune(model, target: Any = "llvm", trials: int = 64, out_dir: str | Path = "tuning",
         shape_dict: dict[str, list[int]] | None = None, max_workers: int = 1, timeout_s: int = 120,
         trials_per_task: int | None = None) -> Path:
    """Tune ``model``'s fused operators for ``target`` and write the records into ``out_dir``."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from lowbit.backends.tvm_lower import import_relax, make_target

    tgt = make_target(target)
    mod, _arrays, _meta = import_relax(model, tgt, shape_dict)
    with tgt, tvm.transform.PassContext(opt_level=3):  # the fusion lowbit_pipeline applies before the records
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builder = ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=timeout_s)
    runner = ms.runner.LocalRunner(timeout_sec=timeout_s)
    ms.relax_integration.tune_relax(
        mod, params={}, target=tgt, work_dir=str(out), max_trials_global=trials,
        max_trials_per_task=trials_per_task, num_trials_per_iter=min(16, trials), builder=builder, runner=runner)
    logger.info("tune: records in %s", out)
    return out


def _shape(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.partition("=")
    if not dims:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D1xD2..., got {text!r}")
    return name, [int(d) for d in dims.split("x")]


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model (lowbit's output)")
    p.add_argument("--out", required=True, help="directory for the records")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"])
    p.add_argument("--trials", type=int, default=64, help="total measured candidates")
    p.add_argument("--shape", type=_shape, action="append", default=[], help="input shape, NAME=D1xD2")
    p.add_argument("--max-workers", type=int, default=1)


def run_tune(args) -> int:
    out = tune(args.model, args.target, args.trials, args.out, dict(args.shape) or None, args.max_workers)
    print(f"tuning records written to {out}")
    return 0


def tune_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit tune", description="Create TVM meta-schedule tuning records.")
    add_tune_arguments(p)
    return run_tune(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(tune_main())
