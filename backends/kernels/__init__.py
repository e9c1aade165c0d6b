"""lowbit's hand-vectorised CPU kernels for its low-bit weight formats (C, built with gcc on first use).

``layout.repack`` turns codes/scales/zero points into the kernels' layout at compile time;
``cpu.linear`` runs y = x @ W (int8 activations per group, exact int32 dots); ``tvm_bridge`` makes
them callable from a TVM-compiled model (``lower-tvm{kernels=lowbit-cpu}``); ``grid`` runs the grid form
(``lowbit.MatMulGrid``: a grid per group, uint8 or float scales) on ``lowbit_grid.c``.
"""

from __future__ import annotations

from .layout import BITS, TILE, Packed, packed_bytes, repack

__all__ = ["BITS", "TILE", "Packed", "packed_bytes", "repack"]
