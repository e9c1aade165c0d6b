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

__all__ = ["CudaGemv", "GemvConfig", "load_module", "kernel_name", "DEFAULT_CONFIGS"]

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


def kernel_name(bits: int, cfg: GemvConfig) -> str:
    return f"gemv_b{bits}_r{cfg.rows}_u{cfg.unroll}_s{int(cfg.split > 1)}_t{32 * cfg.warps}"


def _wrapper_source(configs) -> str:
    lines = [f'#include "{SOURCE.name}"']
    seen = set()
    for bits in CODES_PER_STEP:
        for cfg in configs:
            name = kernel_name(bits, cfg)
            if name not in seen:
                seen.add(name)
                split = "true" if cfg.split > 1 else "false"
                lines.append(f"GEMV_KERNEL({name}, {bits}, {cfg.rows}, {cfg.unroll}, {split}, {32 * cfg.warps})")
    lines += [f"READ_KERNEL(read_u{u}, {u})" for u in READ_UNROLLS]
    return "\n".join(lines) + "\n"


_MODULES: dict = {}


def load_module(configs=DEFAULT_CONFIGS, arch: str = "sm_90"):
    """A ``cupy.RawModule`` holding every kernel of ``configs`` (built by nvcc, cached by source hash)."""
    import cupy as cp

    src = _wrapper_source(configs)
    key = hashlib.sha256((SOURCE.read_text() + src + arch).encode()).hexdigest()[:16]
    if key in _MODULES:
        return _MODULES[key]
    cache = Path(os.environ.get("LOWBIT_CUDA_CACHE", Path(tempfile.gettempdir()) / "lowbit-cuda"))
    cache.mkdir(parents=True, exist_ok=True)
    cubin = cache / f"gemv_{key}.cubin"
    if not cubin.exists():
        cu = cache / f"gemv_{key}.cu"
        cu.write_text(src)
        cmd = ["nvcc", f"-arch={arch}", "-O3", "-cubin", "-I", str(SOURCE.parent), "-o", str(cubin) + ".tmp",
               str(cu)]
        logger.info("building %s", " ".join(cmd))
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(str(cubin) + ".tmp", cubin)
    _MODULES[key] = cp.RawModule(path=str(cubin))
    return _MODULES[key]


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
        self.a, self.s, self.z = a, s, z
        self.h = h if h is not None else cp.zeros(2, cp.uint32)
        self.steps = int(a.shape[1])
        self.k_padded = self.steps * CODES_PER_STEP[bits]
        self.groups = int(s.shape[1])
        self.xpad = cp.zeros(self.k_padded, cp.float16)

    def launch(self, x, y) -> None:
        """``y ← x·Ŵ``; ``x`` fp16 device array of K_padded entries (zero past K), ``y`` float32 [N]."""
        import cupy as cp

        cfg = self.cfg
        sps = -(-self.steps // cfg.split)
        if cfg.split > 1:
            y.fill(0)
        grid = (-(-self.n // (cfg.rows * cfg.warps)), cfg.split)
        self.kernel(grid, (32 * cfg.warps,), (self.a, self.h, self.s, self.z, x, y, cp.int32(self.n),
                                               cp.int32(self.k_padded), cp.int32(self.groups), cp.int32(self.block),
                                               cp.int32(sps)))

    def __call__(self, x):
        """``x``: K values (host or device, any float dtype) → ``y`` float32 device array [N]."""
        import cupy as cp

        self.xpad[: self.k] = cp.asarray(x).astype(cp.float16)
        y = cp.empty(self.n, cp.float32)
        self.launch(self.xpad, y)
        return y
