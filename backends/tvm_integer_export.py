"""Cross-compile an integer-only graph with TVM/LLVM for a device: shared library + params + meta.

    export_tvm(model, "aarch64-linux", "out/m", {"tokens": [1, 64]})
      ─▶ out/m.so          the compiled Relax VM executable (LLVM, linked by the target's gcc)
         out/m.params.npz  the run-time parameters (int8 weights, tables), in call order p0, p1, …
         out/m.json        inputs/outputs (names, dtypes, static shapes), target, num_params

The same lowering as ``lower-tvm`` (:func:`lowbit.backends.tvm_lower.import_relax`: integer ops
through :mod:`lowbit.backends.tvm_integer`); only the target and the linker differ.  On an x86 host
with AVX-512 VNNI the int8 GEMMs use ``vpdpbusd``; on aarch64 they use the portable kernel
(NEON through LLVM's vectoriser).  A device needs TVM's runtime only (``libtvm_runtime.so`` and
``libtvm_ffi.so``), not the compiler: see ``lowbit.runtime.tvm_device``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["DEVICE_TARGETS", "DeviceArtifact", "export_tvm", "device_target"]

logger = logging.getLogger(__name__)

# name -> (TVM target spec, C compiler that links the shared library; None = the host's)
DEVICE_TARGETS: dict[str, tuple[dict | str, str | None]] = {
    "host": ("llvm", None),
    "aarch64-linux": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "aarch64-linux-gnu-gcc"),
}


@dataclass(frozen=True)
class DeviceArtifact:
    lib: Path
    params: Path
    meta: Path
    target: str
    params_bytes: int
    library_bytes: int


def device_target(name: str):
    """(TVM target spec, cross C compiler or None) for a device name, or a clear error."""
    if name not in DEVICE_TARGETS:
        raise LowbitError(f"--target {name!r}: unknown device target", hint=f"use one of {sorted(DEVICE_TARGETS)}")
    spec, cc = DEVICE_TARGETS[name]
    if cc is not None and shutil.which(cc) is None:
        raise LowbitError(f"--target {name}: the cross compiler '{cc}' is not on PATH",
                          hint="install it (Debian: apt-get install gcc-aarch64-linux-gnu)")
    return spec, cc


def export_tvm(model, target: str, out_stem: str | os.PathLike, shape_dict: dict[str, list[int]] | None = None,
               ) -> DeviceArtifact:
    """Compile ``model`` for device ``target`` and write ``<out_stem>.so/.params.npz/.json``."""
    from tvm.support import cc as tvm_cc

    from lowbit.backends.tvm_lower import compile_relax, import_relax

    spec, cc = device_target(target)
    mod, arrays, meta = import_relax(model, spec, shape_dict)
    ex = compile_relax(mod, spec)
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    lib, params, meta_path = (Path(f"{stem}{s}") for s in (".so", ".params.npz", ".json"))
    if cc is None:
        ex.export_library(str(lib))
    else:
        ex.export_library(str(lib), fcompile=tvm_cc.cross_compiler(cc))
    np.savez(params, **{f"p{i}": a for i, a in enumerate(arrays)})
    meta.update(device_target=target, tuning_db=None)
    meta_path.write_text(json.dumps(meta, indent=1))
    nbytes = int(sum(a.nbytes for a in arrays))
    logger.info("export_tvm: wrote %s for %s (%d params, %d bytes)", lib, target, len(arrays), nbytes)
    return DeviceArtifact(lib, params, meta_path, meta["target"], nbytes, lib.stat().st_size)
