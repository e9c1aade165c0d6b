"""The grid form (``lowbit.MatMulGrid``, a mixture of data types per group) on lowbit's CPU kernels.

``W[k, n] = s[n, g] · L_t[c]`` with ``t = types[n, g]`` one of four grids (:data:`lowbit.quant.mod.GRIDS`).
The kernel (``lowbit_grid.c``) multiplies small integer levels with int8 activations, so each grid is
stored as ``L_t ≈ f_t · LEVELS[bits][t]`` (integers, one float ``f_t`` per grid): exact for every 3-bit grid
and the three integer 2-bit grids; the 2-bit Lloyd–Max grid ±{0.4528, 1.5104} becomes 0.15104·±{3, 10}
= ±{0.45312, 1.5104} (inner level 0.07 % off; :func:`level_error` states it).  Scales are uint8 codes times
a float32 step per column (the ``scale_dtype=uint8`` form) or float32.  Codes keep their bits in memory (the
2/3-bit layout of ``layout.repack``); per (tile of 16 rows, group) the grid indices take one uint32 and the
scales 16 bytes: ``bits + 10/G`` bits per weight with uint8 scales, as in the file.  Only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import TILE, repack

__all__ = ["LEVELS", "FACTORS", "GridPacked", "GridLinear", "repack_grid", "grid_linear", "grid_bytes", "level_error",
           "from_file_arrays"]

LEVELS = {
    2: np.array([[-2, -1, 0, 1], [-1, 0, 1, 2], [-3, -1, 1, 3], [-10, -3, 3, 10]], np.int8),
    3: np.array([[-4, -2, -1, 0, 1, 2, 3, 4], [-4, -3, -2, -1, 0, 1, 2, 4], [-4, -2, -1, 0, 1, 2, 4, 6],
                 [-6, -4, -2, -1, 0, 1, 2, 4]], np.int8),
}
FACTORS = {2: np.array([1, 1, 1, 0.15104], np.float32), 3: np.ones(4, np.float32)}


def level_error(grids: np.ndarray, bits: int) -> float:
    """Largest relative difference between ``grids`` [4, 2^b] and the kernel's ``f_t · LEVELS``."""
    k = FACTORS[bits][:, None].astype(np.float64) * LEVELS[bits]
    return float(np.max(np.abs(k - grids) / np.maximum(np.abs(grids), 1e-12)))


@dataclass(frozen=True)
class GridPacked:
    """One grid-form linear in the kernel's layout; ``y = x[..., :K] @ W``."""

    bits: int
    k: int
    n: int
    group: int
    codes: np.ndarray  # uint8, layout.repack's code layout in blocks of max(G, 32)
    types: np.ndarray  # uint32 [NT, ng]
    scales: np.ndarray  # uint8 or float32 [NT, ng, 16]
    step: np.ndarray  # float32 [NT * 16]

    @property
    def kp(self) -> int:
        return self.codes.shape[1] * self.codes.shape[3] // 2

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.types.nbytes + self.scales.nbytes + self.step.nbytes


def grid_bytes(k: int, n: int, bits: int, group: int, scale_bytes: int = 1) -> int:
    """Bytes one [K, N] grid linear takes in the kernel's layout (what a decode step reads)."""
    gc = max(group, 32)
    nt, kp = -(-n // TILE), -(-k // gc) * gc
    return nt * (TILE * kp * bits // 8 + kp // group * (4 + TILE * scale_bytes) + TILE * 4)


def repack_grid(codes: np.ndarray, types: np.ndarray, scales: np.ndarray, step: np.ndarray | None, bits: int,
                group: int) -> GridPacked:
    """Kernel layout of codes [N, K] (< 2^bits), grid indices [N, ng] (0..3), scales [N, ng] (uint8 codes with
    ``step`` [N], or float32 with ``step`` None) for groups of ``group`` inputs."""
    if bits not in LEVELS:
        raise ValueError(f"lowbit-cpu grid kernels: {bits}-bit grids are not supported (2 or 3)")
    if group not in (8, 16, 32, 64, 128):
        raise ValueError(f"lowbit-cpu grid kernels: group {group} is not 8, 16, 32, 64 or 128")
    n, k = codes.shape
    gc = max(group, 32)
    kp = -(-k // gc) * gc
    ng, ngp, nt = -(-k // group), kp // group, -(-n // TILE)
    if types.shape != (n, ng) or scales.shape != (n, ng):
        raise ValueError(f"lowbit-cpu grid kernels: types/scales must be [N, K/group] = [{n}, {ng}]")
    if types.size and int(types.max()) > 3:
        raise ValueError("lowbit-cpu grid kernels: grid indices must be 0..3")
    u8 = step is not None
    if u8 and scales.dtype != np.uint8:
        raise ValueError("lowbit-cpu grid kernels: scales with a step must be uint8 codes")
    code_part = repack(codes, np.zeros((n, kp // gc), np.float32), None, bits, gc).codes
    t = np.zeros((nt * TILE, ngp), np.uint32)
    t[:n, :ng] = types
    tw = (t.reshape(nt, TILE, ngp) << (2 * np.arange(TILE, dtype=np.uint32))[None, :, None]).sum(1, dtype=np.uint32)
    sdt = np.uint8 if u8 else np.float32
    s = np.zeros((nt * TILE, ngp), sdt)
    s[:n, :ng] = scales.astype(sdt)
    st = np.ones(nt * TILE, np.float32)
    if u8:
        st[:n] = np.asarray(step, np.float32).reshape(-1)
    return GridPacked(bits, k, n, group, code_part, np.ascontiguousarray(tw),
                      np.ascontiguousarray(s.reshape(nt, TILE, ngp).transpose(0, 2, 1)), st)


class GridLinear:
    """A packed grid linear with its buffers preallocated for ``rows`` rows (decode loops): ``run_ptr(x_address)``
    writes ``y`` (address ``y_ptr``)."""

    def __init__(self, p: GridPacked, rows: int = 1):
        from . import cpu

        self.p, self.rows = p, rows
        self.y = np.empty((rows, p.n), np.float32)
        ga = max(p.group, 32)
        self.ws = np.empty(rows * p.kp + 64 + 8 * rows * (p.kp // ga) + 4 * rows * (p.kp // p.group) + 64, np.uint8)
        self._lev = np.ascontiguousarray(LEVELS[p.bits].reshape(-1))
        self._fac = FACTORS[p.bits]
        self.y_ptr = self.y.ctypes.data
        fn = cpu.library().lowbit_grid_linear
        args = (p.codes.ctypes.data, p.types.ctypes.data, p.scales.ctypes.data, int(p.scales.dtype == np.uint8),
                p.step.ctypes.data, self._lev.ctypes.data, self._fac.ctypes.data, self.y_ptr, self.ws.ctypes.data)
        self.run_ptr = lambda xp: fn(p.bits, rows, p.k, p.kp, p.n, p.group, xp, *args)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32).reshape(self.rows, self.p.k)
        if self.run_ptr(x.ctypes.data):
            raise ValueError(f"lowbit_grid_linear: bad arguments (bits={self.p.bits}, group={self.p.group})")
        return self.y


def grid_linear(p: GridPacked, x: np.ndarray) -> np.ndarray:
    """y = x @ W for x float32 [..., K]."""
    x2 = np.ascontiguousarray(x, np.float32).reshape(-1, p.k)
    return GridLinear(p, x2.shape[0])(x2).copy().reshape(*x.shape[:-1], p.n)


def from_file_arrays(weight_q: np.ndarray, weight_dtype: np.ndarray, weight_scale: np.ndarray,
                     weight_scale_step: np.ndarray | None, bits: int, group: int, k: int) -> GridPacked:
    """Repack a ``lowbit.MatMulGrid`` node's initializers (:mod:`lowbit.quant.mod_graph`: packed codes of
    ``[nb·g, N]``, grid indices ``[nb, 1, N]``, uint8 scales with a ``[1, 1, N]`` step or float32 scales) for
    ``K = k`` inputs."""
    from lowbit.ops.grid_ops import unpack_codes

    nb, _, n = weight_scale.shape
    q = unpack_codes(weight_q, bits, nb * group * n).reshape(nb * group, n)[:k].T.astype(np.uint8)
    types = np.asarray(weight_dtype).astype(np.uint8).reshape(nb, n).T
    ng = -(-k // group)
    if weight_scale_step is None:
        scales, step = np.asarray(weight_scale, np.float32).reshape(nb, n).T, None
    else:
        scales, step = np.asarray(weight_scale, np.uint8).reshape(nb, n).T, np.asarray(weight_scale_step).reshape(-1)
    return repack_grid(np.ascontiguousarray(q), np.ascontiguousarray(types[:, :ng]),
                       np.ascontiguousarray(scales[:, :ng]), step, bits, group)
