"""``lowbit export MODEL --output OUT.onnx``: an integer-only graph plus its device manifest.

Writes ``OUT.onnx`` and ``OUT.manifest.json`` (format in :mod:`lowbit.api.manifest`).  By default
the graph keeps lowbit's own ops (``lowbit.Requantize``), the form a device runtime implements;
``--lowered`` writes their standard-ONNX bodies instead, which plain ONNX Runtime runs.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    from lowbit.api.options import encoding, int_range

    p = sub.add_parser("export", help="write an integer-only graph and its device manifest", description=__doc__)
    p.add_argument("model")
    p.add_argument("--recipe", default="int8-integer-only", help="an integer-only recipe or pipeline string")
    p.add_argument("--output", "-o", required=True, help="the .onnx to write; the manifest goes beside it")
    p.add_argument("--calibration", required=True, help="text file or folder of .npz samples")
    p.add_argument("--calibration-samples", type=int_range(1), default=64)
    p.add_argument("--encoding", type=encoding, default="utf-8", help="text encoding of --calibration (default utf-8)")
    p.add_argument("--tokenizer", help="tokenizer (llama2.c tok*.bin, or a HF folder)")
    p.add_argument("--lowered", action="store_true", help="expand lowbit ops into standard ONNX ops")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=run)


def device_pipeline(pipeline: str, lowered: bool) -> str:
    """The recipe without backend lowering (and with lower-lowbit last when ``lowered``)."""
    from lowbit.passmanager.pipeline import Pipeline, parse_pipeline

    items = [i for i in parse_pipeline(pipeline) if i.name not in ("lower-ort", "lower-lowbit")]
    text = str(Pipeline(tuple(items)))
    return text + ",lower-lowbit" if lowered else text


def export(model, recipe: str, output, *, calibration, calibration_samples: int = 64, tokenizer=None,
           lowered: bool = False, progress: bool = False, encoding: str = "utf-8") -> dict:
    """Compile ``model`` integer-only and write ``output`` with its manifest beside it, as one unit."""
    from lowbit.api.boundary import boundary

    return boundary(_export, model, recipe, output, calibration=calibration, calibration_samples=calibration_samples,
                    tokenizer=tokenizer, lowered=lowered, progress=progress, encoding=encoding,
                    command="lowbit.export")


def manifest_path(output) -> "Path":
    from pathlib import Path

    from lowbit.errors import InputError

    out = Path(output)
    mpath = out.with_suffix(".manifest.json")
    if len(mpath.name.encode()) > 255:
        raise InputError(f"output '{output}': its manifest name '{mpath.name[:40]}…' would be longer than a file "
                         "name may be (255 bytes)", hint="choose a shorter output name")
    return mpath


def _export(model, recipe, output, *, calibration, calibration_samples, tokenizer, lowered, progress, encoding):
    from pathlib import Path

    from lowbit.api.driver import compile as lowbit_compile
    from lowbit.api.manifest import build_manifest
    from lowbit.errors import PipelineError
    from lowbit.passmanager.recipes import resolve_recipe

    pipeline = device_pipeline(resolve_recipe(recipe), lowered)
    if "dyadic" not in pipeline:
        raise PipelineError(f"'{recipe}' is not an integer-only recipe (no 'dyadic' pass)",
                            hint="use --recipe int8-integer-only")
    out = Path(output)
    mpath = manifest_path(out)
    holder: dict = {}

    def write_manifest(folder: Path, result) -> None:  # into the same temporary folder as the model
        manifest = build_manifest(result.model, out.name, pipeline)
        manifest["report"] = {k: result.report[k] for k in ("migrate-steps", "dyadic") if k in result.report}
        (folder / mpath.name).write_text(json.dumps(manifest, indent=1))
        holder["manifest"] = manifest

    lowbit_compile(model, pipeline, calibration=calibration, output=out, tokenizer=tokenizer,
                   calibration_samples=calibration_samples, progress=progress, encoding=encoding,
                   extra_artifacts=write_manifest)
    return holder["manifest"]


def run(args) -> int:
    import sys

    from lowbit.api.cli import emit

    manifest = export(args.model, args.recipe, args.output, calibration=args.calibration,
                      calibration_samples=args.calibration_samples, tokenizer=args.tokenizer, lowered=args.lowered,
                      progress=sys.stderr.isatty() and not args.json, encoding=args.encoding)
    summary = {k: manifest[k] for k in ("model", "pipeline", "opsets", "ops", "stays_float", "integer_regions")}
    summary.update(gemms=len(manifest["gemms"]), requantize=len(manifest["requantize"]),
                   quantizers=len(manifest["quantizers"]))

    def human():
        for k, v in summary.items():
            print(f"{k:>16}: {v}")

    emit(args, summary, human)
    return 0
