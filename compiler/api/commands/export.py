"""``lowbit export MODEL --output OUT.onnx``: an integer-only graph plus its device manifest.

Writes ``OUT.onnx`` and ``OUT.manifest.json`` (format in :mod:`lowbit.api.manifest`).  By default
the graph keeps lowbit's own ops (``lowbit.Requantize``), the form a device runtime implements;
``--lowered`` writes their standard-ONNX bodies instead, which plain ONNX Runtime runs.

``--target aarch64-linux`` (or ``host``) also cross-compiles the graph with TVM/LLVM for that device:
``OUT.so`` (the Relax VM executable), ``OUT.params.npz`` (int8 weights and tables), ``OUT.json``
(inputs/outputs with static shapes, ``--shapes``) and ``tvm_device.py`` (the runner a device uses with
TVM's runtime only), indexed under the manifest's ``tvm`` field.
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
    p.add_argument("--target", choices=("aarch64-linux", "host"),
                   help="also cross-compile with TVM for this device: OUT.so + OUT.params.npz + OUT.json")
    p.add_argument("--shapes", default="", help="static input shapes for --target, e.g. tokens:1x64 "
                   "(default: the model's, when static)")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=run)


def device_pipeline(pipeline: str, lowered: bool) -> str:
    """The recipe without backend lowering (and with lower-lowbit last when ``lowered``)."""
    from lowbit.passmanager.pipeline import Pipeline, parse_pipeline

    items = [i for i in parse_pipeline(pipeline) if i.name not in ("lower-ort", "lower-lowbit")]
    text = str(Pipeline(tuple(items)))
    return text + ",lower-lowbit" if lowered else text


def export(model, recipe: str, output, *, calibration, calibration_samples: int = 64, tokenizer=None,
           lowered: bool = False, progress: bool = False, encoding: str = "utf-8", target: str | None = None,
           shapes: str = "") -> dict:
    """Compile ``model`` integer-only and write ``output`` with its manifest beside it, as one unit
    (with ``target``, also the TVM library, params and meta for that device)."""
    from lowbit.api.boundary import boundary

    return boundary(_export, model, recipe, output, calibration=calibration, calibration_samples=calibration_samples,
                    tokenizer=tokenizer, lowered=lowered, progress=progress, encoding=encoding, target=target,
                    shapes=shapes, command="lowbit.export")


def manifest_path(output) -> "Path":
    from pathlib import Path

    from lowbit.errors import InputError

    out = Path(output)
    mpath = out.with_suffix(".manifest.json")
    if len(mpath.name.encode()) > 255:
        raise InputError(f"output '{output}': its manifest name '{mpath.name[:40]}…' would be longer than a file "
                         "name may be (255 bytes)", hint="choose a shorter output name")
    return mpath


def _device_files(folder, stem: str, model, target: str, shapes: str) -> dict:
    """Cross-compile into ``folder`` (the compile's staging folder) and describe it for the manifest."""
    import importlib.util
    import shutil
    from pathlib import Path

    import numpy as np
    import tvm

    from lowbit.backends.tvm_integer_export import export_tvm
    from lowbit.backends.tvm_lower import parse_shapes
    from lowbit.errors import InputError

    try:
        shape_dict = parse_shapes(shapes)
    except ValueError as exc:
        raise InputError(f"--shapes {shapes!r}: {exc}", hint="write NAME:D1xD2[+NAME:...], e.g. tokens:1x64") from exc
    art = export_tvm(model, target, Path(folder) / stem, shape_dict)
    runner = importlib.util.find_spec("lowbit.runtime.tvm_device").origin  # standalone: numpy + TVM runtime
    shutil.copyfile(runner, Path(folder) / "tvm_device.py")
    meta = json.loads(art.meta.read_text())
    io_bytes = {k: sum(int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize for v in meta[k])
                for k in ("inputs", "outputs")}
    return {"device_target": target, "tvm_target": art.target, "library": art.lib.name, "params": art.params.name,
            "meta": art.meta.name, "runner": "tvm_device.py", "inputs": meta["inputs"], "outputs": meta["outputs"],
            "runtime": {"tvm": tvm.__version__, "libraries": ["libtvm_runtime.so", "libtvm_ffi.so"],
                        "env": {"TVM_USE_RUNTIME_LIB": "1"}, "python_packages": ["apache-tvm (runtime only)",
                                                                                 "apache-tvm-ffi", "numpy"]},
            "memory": {"params_bytes": art.params_bytes, "library_bytes": art.library_bytes,
                       "input_bytes": io_bytes["inputs"], "output_bytes": io_bytes["outputs"]}}


def _export(model, recipe, output, *, calibration, calibration_samples, tokenizer, lowered, progress, encoding,
            target=None, shapes=""):
    from pathlib import Path

    from lowbit.api.driver import compile as lowbit_compile
    from lowbit.api.manifest import build_manifest
    from lowbit.errors import PipelineError
    from lowbit.passmanager.recipes import resolve_recipe

    from lowbit.errors import InputError

    if target is not None and lowered:
        raise InputError("--target and --lowered do not combine: the TVM build lowers lowbit's ops itself",
                         hint="drop --lowered")
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
        if target is not None:
            manifest["tvm"] = _device_files(folder, out.stem, result.model, target, shapes)
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
                      progress=sys.stderr.isatty() and not args.json, encoding=args.encoding, target=args.target,
                      shapes=args.shapes)
    summary = {k: manifest[k] for k in ("model", "pipeline", "opsets", "ops", "stays_float", "integer_regions")}
    summary.update(gemms=len(manifest["gemms"]), requantize=len(manifest["requantize"]),
                   quantizers=len(manifest["quantizers"]))
    if "tvm" in manifest:
        summary.update(tvm_target=manifest["tvm"]["device_target"], tvm_library=manifest["tvm"]["library"],
                       tvm_memory=manifest["tvm"]["memory"])

    def human():
        for k, v in summary.items():
            print(f"{k:>16}: {v}")

    emit(args, summary, human)
    return 0
