"""``lowbit.compile``: load → run the recipe's pipeline → write the artifact and a report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.data.datasets import load_calibration, model_kind
from lowbit.errors import InvalidWeightsError, ModelLoadError
from lowbit.frontends import load_model
from lowbit.passmanager.instruments import DumpIRInstrument, ReproducerInstrument, TimingInstrument, VerifyInstrument
from lowbit.ir.model_io import save_onnx
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.passmanager.recipes import resolve_recipe

__all__ = ["compile", "CompileResult", "check_weights"]

logger = logging.getLogger(__name__)


@dataclass
class CompileResult:
    model: ir.Model
    pipeline: str
    report: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None
    timing: TimingInstrument | None = None


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_weights(model: ir.Model) -> None:
    """Refuse NaN/Inf in float initializers, naming the first one found."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or t.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        try:
            arr = t.numpy()
        except (OSError, ValueError) as exc:  # an external data file changed or vanished since loading
            raise ModelLoadError(f"initializer '{v.name}': cannot read its data ({exc})",
                                 hint="keep the model's files in place while lowbit runs") from exc
        finite = bool(np.all(np.isfinite(arr)))
        del arr
        if isinstance(t, ir.ExternalTensor):
            t.release()  # unmap: a model over RAM must not stay resident after the check
        if not finite:
            users = ", ".join(sorted({u.node.name or u.node.op_type for u in v.uses()})) or "no node"
            raise InvalidWeightsError(f"initializer '{v.name}' (used by {users}) holds NaN or Inf",
                                      hint="fix or re-export the model; quantizing it would be meaningless")


def compile(model, recipe: str = "w8a8", *, calibration=None, output: str | Path | None = None,
            tokenizer: str | Path | None = None, backend: str = "ort", calibration_samples: int | None = 64,
            seed: int = 0, verify: bool = False, dump_ir: str | Path | None = None,
            reproducer: str | Path | None = None, progress: bool = True, kv_cache: bool = False) -> CompileResult:
    """Compile ``model`` with ``recipe`` (a name from ``RECIPES`` or a pipeline string).

    ``calibration`` is a text file, a folder of ``.npz`` samples, or a list of feed dicts.  With
    ``output`` the compiled model is written atomically (IR version 10).  ``kv_cache`` loads a decoder
    built by lowbit (llama2.c, Hugging Face, GGUF) in its KV-cache form (past/present key/values).
    """
    if backend not in ("ort", "tvm"):
        from lowbit.errors import PipelineError

        raise PipelineError(f"unknown backend '{backend}'", hint="use 'ort' or 'tvm'")
    if output is not None:
        from lowbit.errors import LowbitError

        if Path(output).is_dir():
            raise LowbitError(f"output '{output}' is a folder", hint="give the path of the .onnx file to write")
        blocker = next((p for p in Path(output).parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise LowbitError(f"output '{output}': '{blocker}' is a file, not a folder",
                              hint="choose an output path inside a folder")
    start = time.perf_counter()
    pipeline = resolve_recipe(recipe)
    if backend == "tvm" and "lower-tvm" not in pipeline:
        pipeline = pipeline + ",lower-tvm"
    src = model
    model = load_model(model, tokenizer=tokenizer, kv_cache=kv_cache)
    check_weights(model)
    float_bytes = _weight_bytes(model)
    feeds = load_calibration(model, calibration, tokenizer=tokenizer, limit=calibration_samples)
    ctx = CompileContext(calibration=feeds or None, probes=feeds[:2] or None, seed=seed, show_progress=progress)
    timing = TimingInstrument()
    instruments = [timing]
    if verify or os.environ.get("LOWBIT_VERIFY") == "1":  # tests turn it on for every compile
        instruments.append(VerifyInstrument())
    if dump_ir:
        instruments.append(DumpIRInstrument(dump_ir))
    if reproducer:
        instruments.append(ReproducerInstrument(reproducer, pipeline))
    pm = PassManager.from_pipeline(pipeline, ctx, instruments)
    model = pm.run(model)
    report = ctx.report
    report.update({"source": str(src) if isinstance(src, (str, Path)) else type(src).__name__,
                   "kind": model_kind(model), "pipeline": pipeline, "calibration_samples": len(feeds),
                   "float_weight_bytes": float_bytes, "weight_bytes": _weight_bytes(model)})
    model.metadata_props["lowbit.passmanager.pipeline"] = pipeline
    result = CompileResult(model, pipeline, report, timing=timing)
    if output is not None:
        try:
            result.output = save_onnx(model, output)
        except OSError as exc:  # disk full, permissions: nothing was left behind (atomic write)
            from lowbit.errors import LowbitError

            raise LowbitError(f"cannot write '{output}': {exc}", hint="check free space and permissions") from exc
        report["output"] = str(result.output)
        report["file_bytes"] = result.output.stat().st_size
    report["seconds"] = round(time.perf_counter() - start, 3)
    return result
