"""Launching ``gemv.cu`` from Python through CuPy (imported lazily; nvcc builds a sm_90 cubin once).

:class:`CudaGemv` holds one linear's weights on the device (:class:`~.layout.GpuWeights` uploaded)
and computes ``y = x·Ŵ`` for one fp16 row ``x`` into a float32 ``y``.  A launch configuration is
``(rows per warp, unrolled steps, K splits, warps per block)``; ``split > 1`` adds each split's
partial sum with ``atomicAdd`` into a zeroed ``y`` (the zeroing is one more launch).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .layout import CODES_PER_STEP, GpuWeights

__all__ = ["CudaGemv", "GemvConfig", "load_module", "build_module", "kernel_name", "wrapper_source", "DEFAULT_CONFIGS"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.cu")


@dataclass(frozen=True)
class GemvConfig:
    rows: int = 4  # rows per warp
    unroll: int = 2  # lane steps whose loads are issued before the first use
    split: int = 1  # K splits (grid.y)
    warps: int = 4  # warps per block


DEFAULT_CONFIGS = tuple(GemvConfig(r, u, s, w) for r, u, s, w in (
    (4, 2, 1, 4), (4, 2, 2, 4), (4, 2, 4, 4), (2, 4, 1, 4), (2, 4, 4, 4), (8, 1, 4, 4), (4, 4, 4, 4),
    (2, 2, 8, 4), (4, 1, 8, 4), (1, 8, 4, 4)))
READ_UNROLLS = (2, 4, 8)


def kernel_name(bits: int, cfg: GemvConfig, atomic: bool | None = None) -> str:
    """The kernel of ``cfg``; ``atomic`` (default: split > 1) adds into ``y`` instead of storing."""
    atomic = cfg.split > 1 if atomic is None else atomic
    return f"gemv_b{bits}_r{cfg.rows}_u{cfg.unroll}_s{int(atomic)}_t{32 * cfg.warps}"


def wrapper_source(configs) -> str:
    """CUDA source instantiating the GEMV kernels of ``configs`` and the read-bandwidth kernels."""
    lines = [f'#include "{SOURCE.name}"']
    seen = set()
    for bits in CODES_PER_STEP:
        for cfg in configs:
            for atomic in (True, False) if cfg.split == 1 else (True,):
                name = kernel_name(bits, cfg, atomic)
                if name not in seen:
                    seen.add(name)
                    lines.append(f"GEMV_KERNEL({name}, {bits}, {cfg.rows}, {cfg.unroll}, "
                                 f"{'true' if atomic else 'false'}, {32 * cfg.warps})")
    lines += [f"READ_KERNEL(read_u{u}, {u})" for u in READ_UNROLLS]
    return "\n".join(lines) + "\n"


_MODULES: dict = {}


def build_module(src: str, arch: str = "sm_90", include=SOURCE.parent):
    """A ``cupy.RawModule`` of CUDA source ``src`` (nvcc → cubin, cached by hash in $LOWBIT_CUDA_CACHE)."""
    import cupy as cp

    sources = "".join(p.read_text() for p in sorted(SOURCE.parent.glob("*.cu")))
    key = hashlib.sha256((sources + src + arch).encode()).hexdigest()[:16]
    if key in _MODULES:
        return _MODULES[key]
    cache = Path(os.environ.get("LOWBIT_CUDA_CACHE", Path(tempfile.gettempdir()) / "lowbit-cuda"))
    cache.mkdir(parents=True, exist_ok=True)
    cubin = cache / f"m_{key}.cubin"
    if not cubin.exists():
        cu = cache / f"m_{key}.cu"
        cu.write_text(src)
        cmd = ["nvcc", f"-arch={arch}", "-O3", "-cubin", "-I", str(include), "-o", str(cubin) + ".tmp", str(cu)]
        logger.info("building %s", " ".join(cmd))
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(str(cubin) + ".tmp", cubin)
    _MODULES[key] = cp.RawModule(path=str(cubin))
    return _MODULES[key]


def load_module(configs=DEFAULT_CONFIGS, arch: str = "sm_90"):
    """The GEMV kernels of ``configs`` (and the read-bandwidth kernels) in one module."""
    return build_module(wrapper_source(configs), arch)


class CudaGemv:
    """One linear on the GPU: ``y[N] = x[K]·Ŵ`` (x fp16, y float32)."""

    def __init__(self, w: GpuWeights, cfg: GemvConfig = GemvConfig(), module=None):
        import cupy as cp

        h = cp.asarray(w.h) if w.h is not None else None
        self._setup(w.bits, w.k, w.n, w.block, cp.asarray(w.a), h, cp.asarray(w.s), cp.asarray(w.z), cfg, module)

    @classmethod
    def from_device(cls, bits, k, n, block, a, h, s, z, cfg: GemvConfig, module=None) -> "CudaGemv":
        """From arrays already on the device in the GPU layout (``a`` [N, Kp/CPS, 4] uint32, ...)."""
        self = cls.__new__(cls)
        self._setup(bits, k, n, block, a, h, s, z, cfg, module)
        return self

    def _setup(self, bits, k, n, block, a, h, s, z, cfg, module) -> None:
        import cupy as cp

        self.bits, self.k, self.n, self.block, self.cfg = bits, k, n, block, cfg
        self.module = module if module is not None else load_module((cfg,))
        self.kernel = self.module.get_function(kernel_name(bits, cfg))
        self.kernel_add = self.module.get_function(kernel_name(bits, cfg, True))
        self.a, self.s, self.z = a, s, z
        self.h = h if h is not None else cp.zeros(2, cp.uint32)
        self.steps = int(a.shape[1])
        self.k_padded = self.steps * CODES_PER_STEP[bits]
        self.groups = int(s.shape[1])
        self.xpad = cp.zeros(self.k_padded, cp.float16)

    def launch(self, x, y, accumulate: bool = False) -> None:
        """``y ← x·Ŵ`` (``accumulate``: ``y += x·Ŵ``, one launch, e.g. into a residual stream); ``x`` fp16
        device array of K_padded entries (zero past K), ``y`` float32 [N]."""
        import cupy as cp

        cfg = self.cfg
        sps = -(-self.steps // cfg.split)
        if cfg.split > 1 and not accumulate:
            y.fill(0)
        grid = (-(-self.n // (cfg.rows * cfg.warps)), cfg.split)
        kernel = self.kernel_add if accumulate else self.kernel
        kernel(grid, (32 * cfg.warps,), (self.a, self.h, self.s, self.z, x, y, cp.int32(self.n),
                                               cp.int32(self.k_padded), cp.int32(self.groups), cp.int32(self.block),
                                               cp.int32(sps)))

    def __call__(self, x):
        """``x``: K values (host or device, any float dtype) → ``y`` float32 device array [N]."""
        import cupy as cp

        self.xpad[: self.k] = cp.asarray(x).astype(cp.float16)
        y = cp.empty(self.n, cp.float32)
        self.launch(self.xpad, y)
        return y
