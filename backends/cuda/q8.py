"""Launching ``q8.cu`` (int8-activation low-bit GEMV, dp4a) through CuPy.

:class:`CudaGemvQ8` holds one linear in the q8 layout (:func:`~.layout.to_q8_layout`) on the device.
``quantize(x)`` turns an fp16 row into int8 per 32 values (``q8_quantize_x``: xq, and xd = (scale,
sum of the 32 xq)); ``launch`` runs the GEMV on them.  The configurations are :class:`~.gemv.GemvConfig`.
"""

from __future__ import annotations

import logging

from .gemv import GemvConfig, build_module
from .layout import CODES_PER_STEP, GpuWeights

__all__ = ["CudaGemvQ8", "Q8_CONFIGS", "load_q8_module", "q8_kernel_name", "q8_wrapper_source"]

logger = logging.getLogger(__name__)

Q8_CONFIGS = tuple(GemvConfig(r, u, s, w) for r, u, s, w in (
    (4, 2, 1, 4), (4, 2, 2, 4), (4, 2, 4, 4), (2, 4, 1, 4), (2, 4, 4, 4), (8, 1, 4, 4), (4, 4, 2, 4),
    (2, 2, 8, 4), (4, 1, 8, 4), (2, 4, 2, 8), (8, 2, 2, 4), (1, 8, 4, 4)))


def q8_kernel_name(bits: int, cfg: GemvConfig, atomic: bool | None = None) -> str:
    atomic = cfg.split > 1 if atomic is None else atomic
    return f"q8_b{bits}_r{cfg.rows}_u{cfg.unroll}_s{int(atomic)}_t{32 * cfg.warps}"


def load_q8_module(configs=Q8_CONFIGS, arch: str = "sm_90"):
    """The q8 GEMV kernels of ``configs`` and ``q8_quantize_x`` in one module."""
    return build_module(q8_wrapper_source(configs), arch)


def q8_wrapper_source(configs=Q8_CONFIGS) -> str:
    """CUDA source instantiating the q8 GEMV kernels of ``configs`` (``Q8_GEMV_KERNEL`` lines)."""
    lines, seen = ['#include "q8.cu"'], set()
    for bits in CODES_PER_STEP:
        for cfg in configs:
            for atomic in (True, False) if cfg.split == 1 else (True,):
                name = q8_kernel_name(bits, cfg, atomic)
                if name not in seen:
                    seen.add(name)
                    lines.append(f"Q8_GEMV_KERNEL({name}, {bits}, {cfg.rows}, {cfg.unroll}, "
                                 f"{'true' if atomic else 'false'}, {32 * cfg.warps})")
    return "\n".join(lines) + "\n"


class CudaGemvQ8:
    """One linear on the GPU with int8 activations: ``y[N] = x[K]·Ŵ`` (x fp16, y float32)."""

    def __init__(self, w: GpuWeights, cfg: GemvConfig = GemvConfig(), module=None):
        import cupy as cp

        h = cp.asarray(w.h) if w.h is not None else None
        self._setup(w.bits, w.k, w.n, w.block, cp.asarray(w.a), h, cp.asarray(w.s), cp.asarray(w.z), cfg, module)

    @classmethod
    def from_device(cls, bits, k, n, block, a, h, s, z, cfg: GemvConfig, module=None) -> "CudaGemvQ8":
        self = cls.__new__(cls)
        self._setup(bits, k, n, block, a, h, s, z, cfg, module)
        return self

    def _setup(self, bits, k, n, block, a, h, s, z, cfg, module) -> None:
        import cupy as cp

        self.bits, self.k, self.n, self.block, self.cfg = bits, k, n, block, cfg
        self.module = module if module is not None else load_q8_module((cfg,))
        self.kernel = self.module.get_function(q8_kernel_name(bits, cfg))
        self.kernel_add = self.module.get_function(q8_kernel_name(bits, cfg, True))
        self.quant = self.module.get_function("q8_quantize_x")
        self.a, self.s, self.z = a, s, z
        self.h = h if h is not None else cp.zeros(2, cp.uint32)
        self.steps = int(a.shape[1])
        self.k_padded = self.steps * CODES_PER_STEP[bits]
        self.groups = int(s.shape[1])
        self.xpad = cp.zeros(self.k_padded, cp.float16)
        self.xq = cp.zeros(self.k_padded, cp.int8)
        self.xd = cp.zeros((self.k_padded // 32, 2), cp.float32)

    def quantize(self, x) -> None:
        """xq, xd ← int8 of the fp16 device row ``x`` (K_padded entries, zero past K)."""
        import cupy as cp

        threads = self.k_padded // 8
        self.quant((-(-threads // 256),), (256,), (x, self.xq, self.xd, cp.int32(self.k_padded)))

    def launch(self, y, accumulate: bool = False) -> None:
        """``y ← x·Ŵ`` from the last :meth:`quantize` (``accumulate``: ``y += x·Ŵ``)."""
        import cupy as cp

        cfg = self.cfg
        sps = -(-self.steps // cfg.split)
        if cfg.split > 1 and not accumulate:
            y.fill(0)
        grid = (-(-self.n // (cfg.rows * cfg.warps)), cfg.split)
        kernel = self.kernel_add if accumulate else self.kernel
        kernel(grid, (32 * cfg.warps,), (self.a, self.h, self.s, self.z, self.xq, self.xd, y, cp.int32(self.n),
                                         cp.int32(self.k_padded), cp.int32(self.groups), cp.int32(self.block),
                                         cp.int32(sps)))

    def __call__(self, x):
        """``x``: K values (host or device) → ``y`` float32 device array [N]."""
        import cupy as cp

        self.xpad[: self.k] = cp.asarray(x).astype(cp.float16)
        self.quantize(self.xpad)
        y = cp.empty(self.n, cp.float32)
        self.launch(y)
        return y
