"""Lower an ONNX model (lowbit's output) to a TVM shared library plus its parameters.

    model ─▶ prepare_for_tvm (low-bit weights → NBitsMatMul in the kernel's layout)
          ─▶ tvm.relax.frontend.onnx.from_onnx (+ lowbit's converters, tvm_convert.py)
          ─▶ [MetaScheduleApplyDatabase, if tuning records are given]
          ─▶ tvm.compile with tvm_pipeline.lowbit_pipeline (TVM's default; dlight on CUDA)
          ─▶ <name>.so, <name>.params.npz, <name>.json (inputs, outputs, target)

Large initializers become run-time parameters (graph inputs at import), so a large model links fast
and the library stays small; :class:`lowbit.runtime.tvm_runner.TvmSession` loads all three.
TVM is imported only inside these functions.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lowbit.errors import LowbitError
from lowbit.passmanager.manager import Pass, PassResult, register_pass

__all__ = ["TvmArtifact", "lower_tvm", "tvm_params", "import_relax", "compile_relax", "export_artifact", "make_target", "parse_shapes", "LowerTvm"]

logger = logging.getLogger(__name__)

PARAM_MIN_ELEMENTS = 4096  # initializers at least this large become run-time parameters


@dataclass(frozen=True)
class TvmArtifact:
    lib: Path
    params: Path
    meta: Path
    target: str


def make_target(target: Any = "llvm"):
    """A tvm Target: "llvm" means this host's CPU (LLVM's detection, or $LOWBIT_TVM_MCPU);
    "cuda" means sm_90 (override with $LOWBIT_TVM_CUDA_ARCH)."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "llvm":
        mcpu = os.environ.get("LOWBIT_TVM_MCPU")
        if not mcpu:
            get_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
            mcpu = get_cpu() if get_cpu is not None else None
        spec = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
        if mcpu and mcpu != "generic":
            spec["mcpu"] = mcpu
        return tvm.target.Target(spec)
    if target == "cuda":
        arch = os.environ.get("LOWBIT_TVM_CUDA_ARCH", "sm_90")
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    return tvm.target.Target(target)


def _as_model(model) -> ir.Model:
    from lowbit.ir.model_io import load_onnx

    if isinstance(model, ir.Model):
        # Work on a copy: preparing rewrites weights into kernel layouts.
        return ir.serde.deserialize_model(ir.serde.serialize_model(model))
    if isinstance(model, (str, os.PathLike)):
        return load_onnx(model)
    return ir.serde.deserialize_model(model)  # a ModelProto


def _value_info(values) -> list[dict]:
    out = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        out.append({"name": v.name, "dtype": np.dtype(v.dtype.numpy()).name, "shape": dims})
    return out


def _static_shapes(m: ir.Model, shape_dict) -> dict[str, list[int]]:
    # TVM's importer loses shapes through data-dependent Slice/Reshape chains (the RoPE tables
    # sliced to the sequence length): every input shape must be static.
    shape_dict = dict(shape_dict or {})
    for v in m.graph.inputs:
        if v.name in shape_dict:
            continue
        dims = list(v.shape or [])
        if not all(isinstance(d, int) for d in dims):
            example = "x".join(str(d) if isinstance(d, int) else "1" if i == 0 else "64" for i, d in enumerate(dims))
            raise LowbitError(f"TVM lowering: input '{v.name}' has symbolic shape {dims}",
                              hint=f"give static shapes, one artifact per shape: --recipe 'RECIPE,"
                                   f"lower-tvm{{shapes={v.name}:{example}}}' or pass "
                                   f"shape_dict={{'{v.name}': [...]}} (Python); KV-cache graphs (--kv-cache) need none")
        shape_dict[v.name] = dims
    return shape_dict


def _lift_params(m: ir.Model, shape_dict: dict) -> list[np.ndarray]:
    """Turn large initializers into trailing graph inputs (weights stay out of the library);
    small ones stay constants so that TVM folds shape arithmetic."""
    arrays = []
    for name, value in list(m.graph.initializers.items()):
        t = value.const_value
        if t is None or t.size < PARAM_MIN_ELEMENTS or t.dtype == ir.DataType.INT64:
            continue
        arr = t.numpy()
        del m.graph.initializers[name]
        m.graph.inputs.append(value)
        shape_dict[name] = list(arr.shape)
        arrays.append(arr)
    return arrays


def tvm_params(model, layout: str = "tiled", shape_dict: dict[str, list[int]] | None = None,
               kernels: str | None = None) -> list[np.ndarray]:
    """The run-time parameters ``lower_tvm`` would write for ``model``, computed without TVM (for a
    machine that has only the TVM runtime and rebuilds the model itself)."""
    from lowbit.backends.tvm_prepare import prepare_for_tvm

    m = _as_model(model)
    shape_dict = _static_shapes(m, shape_dict)
    from lowbit.backends.tvm_integer import fold_static_shapes, fuse_integer_gemms

    fold_static_shapes(m, shape_dict)
    prepare_for_tvm(m, layout=layout, kernels=kernels)
    if layout == "tiled":
        fuse_integer_gemms(m)
    return _lift_params(m, shape_dict)


def import_relax(model, target: Any = "llvm", shape_dict: dict[str, list[int]] | None = None,
                 kernels: str | None = None):
    """(IRModule with params as inputs, list of param arrays, meta dict) for ``model``."""
    from lowbit.backends.tvm_prepare import prepare_for_tvm

    tgt = make_target(target)
    m = _as_model(model)
    shape_dict = _static_shapes(m, shape_dict)
    if kernels and tgt.kind.name == "cuda":
        raise LowbitError(f"TVM lowering: kernels={kernels} runs on CPU only", hint="use target=llvm, or no kernels")
    from lowbit.backends.tvm_integer import fold_static_shapes, fuse_integer_gemms

    folded = fold_static_shapes(m, shape_dict)  # integer graphs only (tvm_integer.py)
    stats = prepare_for_tvm(m, layout="rows" if tgt.kind.name == "cuda" else "tiled", kernels=kernels)
    if tgt.kind.name != "cuda":  # integer graphs: requantizes fused into their int8 GEMMs
        stats["requantize_fused"], stats["shape_nodes_folded"] = fuse_integer_gemms(m), folded
    meta = {"kernels": kernels or "", "inputs": _value_info(m.graph.inputs), "outputs": _value_info(m.graph.outputs),
            "target": str(tgt), "device": "cuda" if tgt.kind.name == "cuda" else "cpu", "prepare": stats,
            "shape_dict": shape_dict}
    arrays = _lift_params(m, shape_dict)
    return import_onnx(m, tgt, shape_dict), arrays, {**meta, "num_params": len(arrays)}


def import_onnx(m: ir.Model, tgt, shape_dict: dict):
    """Relax IRModule of a prepared model through TVM's ONNX importer with lowbit's converters."""
    from tvm.relax.frontend.onnx import from_onnx

    from lowbit.backends.tvm_convert import lowbit_converters
    from lowbit.ir.sessions import to_proto

    dtypes = {v.name: np.dtype(v.dtype.numpy()).name for v in m.graph.inputs}
    try:
        with tgt, lowbit_converters(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Renaming name")
            return from_onnx(to_proto(m), shape_dict=shape_dict, dtype_dict=dtypes, keep_params_in_input=False)
    except NotImplementedError as exc:
        raise LowbitError(f"TVM import failed: {exc}", hint="this op needs a converter in backends/tvm_convert.py") from exc
    except Exception as exc:
        raise LowbitError(f"TVM import failed: {type(exc).__name__}: {exc}") from exc


def compile_relax(mod, target: Any = "llvm", tuning_db: str | os.PathLike | None = None):
    """tvm.compile with lowbit's pipeline (TVM's default + tuning records + robust dlight on GPUs)."""
    import tvm

    from lowbit.backends.tvm_pipeline import lowbit_pipeline

    tgt = make_target(target)
    if tuning_db is not None and not Path(tuning_db).is_dir():
        raise LowbitError(f"tuning records {tuning_db}: no such directory",
                          hint="create them with lowbit.backends.tvm_tune.tune")
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=tgt, relax_pipeline=lowbit_pipeline(tgt, tuning_db))


def lower_tvm(model, target: Any = "llvm", out_dir: str | os.PathLike = "out", name: str = "model",
              shape_dict: dict[str, list[int]] | None = None, tuning_db: str | os.PathLike | None = None,
              kernels: str | None = None) -> TvmArtifact:
    """Import, compile and export ``model`` (an ``ir.Model``, ModelProto or path) for ``target``."""
    mod, arrays, meta = import_relax(model, target, shape_dict, kernels)
    return export_artifact(compile_relax(mod, target, tuning_db), arrays, meta, out_dir, name, tuning_db)


def export_artifact(ex, arrays, meta: dict, out_dir: str | os.PathLike, name: str,
                    tuning_db: str | os.PathLike | None = None) -> TvmArtifact:
    """Write a compiled executable as ``NAME.so`` + ``NAME.params.npz`` + ``NAME.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib, params, meta_path = out / f"{name}.so", out / f"{name}.params.npz", out / f"{name}.json"
    ex.export_library(str(lib))
    np.savez(params, **{f"p{i}": a for i, a in enumerate(arrays)})
    meta["tuning_db"] = None if tuning_db is None else str(tuning_db)
    meta_path.write_text(json.dumps(meta, indent=1))
    logger.info("wrote %s (%d params)", lib, len(arrays))
    return TvmArtifact(lib, params, meta_path, meta["target"])


def parse_shapes(text: str) -> dict[str, list[int]] | None:
    """``"tokens:1x8+mask:1x8"`` -> {"tokens": [1, 8], "mask": [1, 8]} (pipeline-string friendly)."""
    if not text:
        return None
    out = {}
    for part in text.split("+"):
        name, sep, dims = part.rpartition(":")
        if not sep or not name:
            raise ValueError(f"lower-tvm: shapes wants NAME:D1xD2[+NAME:...], got {text!r}")
        out[name] = [int(d) for d in dims.split("x")]
    return out


KV_LOWERING: list = []  # lowbit.backends.tvm_decoder registers lower_kv_tvm here (it imports this module)


def _is_kv_graph(model: ir.Model) -> bool:
    names = [v.name for v in model.graph.inputs]
    return "input_ids" in names and any(n.startswith("past_key_values.") for n in names)


@register_pass("lower-tvm")
class LowerTvm(Pass):
    """Compile the model with TVM and record the artifact in ``ctx.report["tvm"]``; the IR is unchanged."""

    @dataclass(frozen=True)
    class Options:
        target: str = "llvm"
        out_dir: str = "out/tvm"
        name: str = "model"
        shapes: str = ""  # static input shapes, e.g. "tokens:1x64" (needed when inputs are symbolic)
        tuning_db: str = ""
        kernels: str = ""  # "lowbit-cpu": low-bit linears (2/3/4/8-bit) call lowbit's C kernels (CPU)

        def __post_init__(self):
            if self.target not in ("llvm", "cuda"):
                raise ValueError(f"lower-tvm: target must be 'llvm' or 'cuda', got {self.target!r}")
            parse_shapes(self.shapes)
            if self.kernels not in ("", "lowbit-cpu"):
                raise ValueError(f"lower-tvm: kernels must be '' or 'lowbit-cpu', got {self.kernels!r}")
            if self.kernels and self.target != "llvm":
                raise ValueError("lower-tvm: kernels=lowbit-cpu needs target=llvm")

    def call(self, model: ir.Model) -> PassResult:
        o = self.options
        if not o.shapes and not o.kernels and _is_kv_graph(model) and KV_LOWERING:  # one artifact, every length
            art = KV_LOWERING[0](model, o.target, self.ctx.stage(o.out_dir), o.name, tuning_db=o.tuning_db or None)
        else:
            art = lower_tvm(model, o.target, self.ctx.stage(o.out_dir), o.name, shape_dict=parse_shapes(o.shapes),
                            tuning_db=o.tuning_db or None,
                            kernels=o.kernels or None)  # staged: moved into out_dir only if the compile succeeds
        final = Path(o.out_dir)
        self.ctx.report["tvm"] = {"lib": str(final / art.lib.name), "params": str(final / art.params.name),
                                  "meta": str(final / art.meta.name), "target": art.target}
        self.stats["artifacts"] += 1
        return PassResult(model, modified=False)
