"""lowbit's CUDA kernels (sm_90): low-bit GEMV for lowbit's 2/3/4-bit weight formats.

``layout`` (numpy) turns stored MatMulNBits / MatMul3Bit weights into the GPU layout; ``gemv``
launches ``gemv.cu`` through CuPy.  Nothing here imports CuPy until a kernel is launched.
"""

from __future__ import annotations

__all__: list[str] = []
