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

from lowbit.data.datasets import MIN_TRUSTED_TOKENS, load_calibration, model_kind
from lowbit.errors import InvalidWeightsError, ModelLoadError
from lowbit.frontends import load_model
from lowbit.passmanager.instruments import DumpIRInstrument, ReproducerInstrument, TimingInstrument, VerifyInstrument
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


_MASK_OPS = {"Where", "Expand", "Min", "Max", "Clip", "ConstantOfShape"}  # optimum exports fill masks with -inf


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
        if not finite and not np.any(np.isnan(arr)) and v.uses() and all(  # ±inf attention-mask fill values
                u.node.op_type in _MASK_OPS for u in v.uses()):
            finite = True
        del arr
        if isinstance(t, ir.ExternalTensor):
            t.release()  # unmap: a model over RAM must not stay resident after the check
        if not finite:
            users = ", ".join(sorted({u.node.name or u.node.op_type for u in v.uses()})) or "no node"
            raise InvalidWeightsError(f"initializer '{v.name}' (used by {users}) holds NaN or Inf",
                                      hint="fix or re-export the model; quantizing it would be meaningless")


def _check_args(backend, calibration_samples, seed, encoding) -> None:
    from lowbit.errors import InputError, PipelineError
    from lowbit.files import check_encoding

    if backend not in ("ort", "tvm"):
        raise PipelineError(f"unknown backend '{backend}'", hint="use 'ort' or 'tvm'")
    if calibration_samples is not None and (isinstance(calibration_samples, bool)
                                            or not isinstance(calibration_samples, int) or calibration_samples < 1):
        raise InputError(f"calibration_samples must be a whole number >= 1, got {calibration_samples!r}",
                         hint="pass --calibration-samples N with N >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise InputError(f"seed must be a whole number in [0, 2^32), got {seed!r}")
    check_encoding(encoding)


def tvm_pipeline(pipeline: str) -> str:
    """The pipeline for ``--backend tvm``: no ORT lowering (``lower-ort`` dropped; ``lower-lowbit`` keeps the
    integer ops, which ``lower-tvm`` compiles to its own kernels), ending in ``lower-tvm``."""
    from lowbit.backends.tvm_integer import INTEGER_OPS
    from lowbit.passmanager.pipeline import Pipeline, PipelineItem, parse_pipeline

    items = []
    for item in parse_pipeline(pipeline):
        if item.name == "lower-ort":
            continue
        if item.name == "lower-lowbit":
            kept = [v for k, v in item.options if k == "keep"]
            ops = dict.fromkeys([*(o for v in kept for o in str(v).split("+") if o), *INTEGER_OPS])
            item = PipelineItem(item.name, tuple((k, v) for k, v in item.options if k != "keep") + (("keep", "+".join(ops)),))
        items.append(item)
    if not any(i.name == "lower-tvm" for i in items):
        items.append(PipelineItem("lower-tvm"))
    return str(Pipeline(tuple(items)))


def _calibration_tokens(feeds) -> int:
    return sum(max((np.asarray(v).size for v in f.values()), default=0) for f in feeds if isinstance(f, dict))


def compile(model, recipe: str = "w8a8", *, calibration=None, output: str | Path | None = None,
            tokenizer: str | Path | None = None, backend: str = "ort", calibration_samples: int | None = 64,
            seed: int = 0, verify: bool = False, dump_ir: str | Path | None = None,
            reproducer: str | Path | None = None, progress: bool = True, encoding: str = "utf-8",
            check_output: bool = True, extra_artifacts=None, **load_options) -> CompileResult:
    """Compile ``model`` with ``recipe`` (a name from ``RECIPES`` or a pipeline string).

    ``calibration`` is a text file, a folder of ``.npz`` samples, or a list of feed dicts.  With
    ``output`` the compiled model — and every other file of the run (``extra_artifacts(folder, result)``
    writes more, a saved plan, a TVM library) — is written into one temporary folder, loaded in ONNX
    Runtime and run on one sample (``check_output``), and only then moved into place.  Raises only
    :class:`LowbitError` subclasses (exit code 2: your input; 3: a lowbit bug, with a crash report).
    ``load_options`` go to the frontend's ``load_model``: ``kv_cache=True`` loads a decoder built by lowbit
    (llama2.c, Hugging Face, GGUF) in its KV-cache form (past/present key/values).
    """
    from lowbit.api.boundary import boundary

    return boundary(_compile, model, recipe, calibration=calibration, output=output, tokenizer=tokenizer,
                    backend=backend, calibration_samples=calibration_samples, seed=seed, verify=verify,
                    dump_ir=dump_ir, reproducer=reproducer, progress=progress, encoding=encoding,
                    check_output=check_output, extra_artifacts=extra_artifacts, load_options=load_options,
                    command="lowbit.compile")


def _compile(model, recipe, *, calibration, output, tokenizer, backend, calibration_samples, seed, verify, dump_ir,
             reproducer, progress, encoding, check_output, extra_artifacts, load_options) -> CompileResult:
    from lowbit.api import preflight

    start = time.perf_counter()
    _check_args(backend, calibration_samples, seed, encoding)
    if output is not None:
        preflight.check_output(output)
    if dump_ir:
        preflight.check_instrument_dir(dump_ir, "--dump-ir")
    if reproducer:
        preflight.check_instrument_dir(reproducer, "--reproducer")
    pipeline = resolve_recipe(recipe)
    if backend == "tvm":
        pipeline = tvm_pipeline(pipeline)
    preflight.check_pipeline_paths(pipeline)
    preflight.check_model_source(model)
    if tokenizer is not None:
        preflight.check_model_source(tokenizer, "tokenizer")
    src = model
    model = load_model(model, tokenizer=tokenizer, **load_options)
    check_weights(model)
    from lowbit.frontends.onnx_file import refuse_quantized

    refuse_quantized(model, str(src) if isinstance(src, (str, Path)) else "the model")
    float_bytes = _weight_bytes(model)
    feeds = load_calibration(model, calibration, tokenizer=tokenizer, limit=calibration_samples, encoding=encoding)
    ctx = CompileContext(calibration=feeds or None, probes=feeds[:2] or None, seed=seed, show_progress=progress)
    from lowbit.ir.subgraphs import subgraph_linears

    ctx.report.setdefault("float_layers", []).extend(subgraph_linears(model.graph))  # If/Loop bodies stay float
    timing = TimingInstrument()
    instruments = [timing]
    if verify or os.environ.get("LOWBIT_VERIFY") == "1":  # tests turn it on for every compile
        instruments.append(VerifyInstrument())
    if dump_ir:
        instruments.append(DumpIRInstrument(dump_ir))
    if reproducer:
        instruments.append(ReproducerInstrument(reproducer, pipeline))
    if output is None:
        return _run(model, src, pipeline, ctx, instruments, timing, feeds, float_bytes, start, None, None,
                    check_output, extra_artifacts)
    from lowbit.ir.staging import ArtifactSet

    with ArtifactSet(output) as art:
        ctx.stage = art.stage  # passes that write files (save=, lower-tvm) write into the set
        result = _run(model, src, pipeline, ctx, instruments, timing, feeds, float_bytes, start, art, output,
                      check_output, extra_artifacts)
        art.commit()
    result.output = Path(output)
    result.report["output"] = str(result.output)
    result.report["file_bytes"] = result.output.stat().st_size
    return result


def _run(model, src, pipeline, ctx, instruments, timing, feeds, float_bytes, start, art, output, check_output,
         extra_artifacts) -> CompileResult:
    from lowbit.ir.accumulator import check_accumulators

    pm = PassManager.from_pipeline(pipeline, ctx, instruments)
    model = pm.run(model)
    sites = check_accumulators(model)  # an int32 accumulator that can wrap is refused, naming the layer
    report = ctx.report
    report.update({"source": str(src) if isinstance(src, (str, Path)) else type(src).__name__,
                   "kind": model_kind(model), "pipeline": pipeline, "calibration_samples": len(feeds),
                   "float_weight_bytes": float_bytes, "weight_bytes": _weight_bytes(model)})
    if sites:
        report["int32_accumulators"] = {"gemms": len(sites), "max_bound": max(s.bound for s in sites)}
    tokens = _calibration_tokens(feeds)
    if feeds and tokens < MIN_TRUSTED_TOKENS:
        report.setdefault("warnings", []).append(
            f"calibration holds only {tokens} token(s)/values (< {MIN_TRUSTED_TOKENS}): ranges are unreliable")
    model.metadata_props["lowbit.passmanager.pipeline"] = pipeline
    result = CompileResult(model, pipeline, report, timing=timing)
    if art is not None:
        from lowbit.api.smoke import check_artifact
        from lowbit.files import os_error
        from lowbit.ir.model_io import write_onnx

        target = art.dir / Path(output).name
        try:
            write_onnx(model, target)
            if extra_artifacts is not None:
                extra_artifacts(art.dir, result)
        except OSError as exc:  # disk full, permissions: the temporary folder is removed, nothing is left
            raise os_error(exc, output, "output") from None
        if check_output:
            report["output_check"] = check_artifact(target, feeds)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return result
