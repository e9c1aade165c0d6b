"""lowbit's stored low-bit weights → the GPU layout that ``gemv.cu`` reads (numpy only, run once at load).

Inputs are lowbit's formats exactly as written in a model file:

* ``com.microsoft.MatMulNBits`` (2 and 4 bits): ``B`` uint8 ``[N, G, block·b/8]`` (codes along K,
  low bits first), ``scales`` float ``[N·G]`` or ``[N, G]``, ``zero_points`` uint8
  ``[N, ⌈G·b/8⌉]`` packed the same way (absent: 2^(b−1)).
* ``lowbit.MatMul3Bit``: ``B`` uint8 ``[N, ⌈K/8⌉·3]`` (8 codes per 3 bytes, low bits first),
  ``scales`` ``[N, G]``, ``zero_points`` uint8 ``[N, G]``.

Both mean ``W[k, n] = (q[n, k] − z[n, k // block])·s[n, k // block]``.  The GPU layout keeps the same
codes at the same number of bits (3-bit stays 3 bits: a 2-bit plane plus a 1-bit plane), only
reordered so that a 32-bit word decodes into fp16 pairs with one shift and one mask:

* ``A`` uint32 ``[N, Kp/CPS, 4]`` (one 16-byte load per lane step; CPS = 32 codes for 4 bits, 64
  for 2 and 3 bits).  4 bits: word j of a step holds codes 8j..8j+7, code 2i at bits 4i..4i+3 and
  code 2i+1 at bits 16+4i..; 2 bits (and the low two bits of 3-bit codes): 16 codes a word, code 2i
  at bits 2i..2i+1, code 2i+1 at bits 16+2i...
* ``H`` uint32 ``[N, Kp/64, 2]`` (3 bits only): the high bit, 32 codes a word, code 2i at bit i,
  code 2i+1 at bit 16+i.
* ``S`` float32 ``[N, Gp]`` and ``Z`` uint8 ``[N, Gp]`` (zero points unpacked to one byte).

K is zero-padded to Kp, a multiple of the step (the launcher zero-pads x, so padded codes add
nothing); groups to Gp = ⌈Kp/block⌉.  ``block`` must be a multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GpuWeights", "CODES_PER_STEP", "from_matmulnbits", "from_matmul3bit", "to_gpu_layout",
           "codes_from_gpu_layout", "reference_gemv", "to_q8_layout", "codes_from_q8_layout"]

CODES_PER_STEP = {4: 32, 3: 64, 2: 64}


@dataclass(frozen=True)
class GpuWeights:
    """One linear's weights in the GPU layout (host numpy arrays; see the module doc)."""

    bits: int
    k: int  # the real K (x has this many entries)
    n: int
    block: int
    a: np.ndarray
    h: np.ndarray | None
    s: np.ndarray
    z: np.ndarray

    @property
    def k_padded(self) -> int:
        return self.a.shape[1] * CODES_PER_STEP[self.bits]

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV must read for the weights (codes, scales, zero points)."""
        return self.a.nbytes + (0 if self.h is None else self.h.nbytes) + self.s.nbytes + self.z.nbytes


def _unpack_le(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 ``[..., L]`` with ``8/bits`` codes a byte, low bits first → uint8 ``[..., count]``."""
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], -1)[..., :count].astype(np.uint8)


def from_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                     block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits ``(B, scales, zero_points)`` → codes ``[N, K]``, scales ``[N, G]`` f32, zeros ``[N, G]`` u8."""
    if bits not in (2, 4):
        raise ValueError(f"GPU GEMV: MatMulNBits with bits={bits} (2 or 4 supported)")
    g = -(-k // block)
    codes = _unpack_le(np.asarray(b, np.uint8).reshape(n, g * block * bits // 8), bits, k)
    s = np.asarray(scales, np.float32).reshape(n, g)
    if zero_points is None:
        z = np.full((n, g), 1 << (bits - 1), np.uint8)
    else:
        z = _unpack_le(np.asarray(zero_points, np.uint8).reshape(n, -1), bits, g)
    return codes, s, z


def from_matmul3bit(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lowbit.MatMul3Bit ``(B, scales, zero_points)`` → codes ``[N, K]``, scales, zeros ``[N, G]``."""
    packed = np.asarray(b, np.uint8)
    n = packed.shape[0]
    trip = packed.reshape(n, -1, 3).astype(np.uint32)
    word = trip[..., 0] | (trip[..., 1] << 8) | (trip[..., 2] << 16)
    codes = ((word[..., None] >> (3 * np.arange(8, dtype=np.uint32))) & 7).reshape(n, -1)[:, :k]
    return codes.astype(np.uint8), np.asarray(scales, np.float32), np.asarray(zero_points, np.uint8)


def _pair_words(codes: np.ndarray, width: int) -> np.ndarray:
    """codes ``[N, M·2p]`` (p = 16/width pairs a word) → uint32 ``[N, M]``: code 2i at bit width·i,
    code 2i+1 at bit 16 + width·i."""
    n = codes.shape[0]
    p = 16 // width
    c = codes.astype(np.uint32).reshape(n, -1, p, 2)
    sh = (width * np.arange(p, dtype=np.uint32))
    lo = (c[..., 0] << sh).sum(axis=-1, dtype=np.uint32)
    hi = (c[..., 1] << (sh + 16)).sum(axis=-1, dtype=np.uint32)
    return lo | hi


def _to_layout(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block: int,
               pack) -> GpuWeights:
    """Pads codes/scales/zeros to whole steps and groups and packs the codes with ``pack(codes, width)``
    (4-bit codes whole; 2/3-bit codes as a 2-bit plane, plus a 1-bit plane for 3-bit)."""
    if bits not in CODES_PER_STEP:
        raise ValueError(f"GPU GEMV: bits={bits} (2, 3 or 4 supported)")
    if block % 32:
        raise ValueError(f"GPU GEMV: block size {block} is not a multiple of 32")
    n, k = codes.shape
    cps = CODES_PER_STEP[bits]
    kp = -(-k // cps) * cps
    gp = -(-kp // block)
    c = np.zeros((n, kp), np.uint8)
    c[:, :k] = codes
    s = np.zeros((n, gp), np.float32)
    z = np.zeros((n, gp), np.uint8)
    s[:, :scales.shape[1]], z[:, :zeros.shape[1]] = scales, zeros
    if bits == 4:
        a, h = pack(c, 4), None
    else:
        a = pack(c & 3, 2)
        h = pack(c >> 2, 1).reshape(n, kp // 64, 2) if bits == 3 else None
    return GpuWeights(bits, k, n, block, np.ascontiguousarray(a.reshape(n, kp // cps, 4)), h, s, z)


def to_gpu_layout(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> GpuWeights:
    """codes ``[N, K]`` (uint, < 2^bits), scales/zeros ``[N, G]`` → :class:`GpuWeights`."""
    return _to_layout(codes, scales, zeros, bits, block, _pair_words)


def codes_from_gpu_layout(w: GpuWeights) -> np.ndarray:
    """The codes ``[N, K]`` that ``w`` holds (the inverse of :func:`to_gpu_layout`, for checks)."""
    n = w.n
    width = 4 if w.bits == 4 else 2
    p = 16 // width
    words = w.a.reshape(n, -1, 1)
    sh = (width * np.arange(p, dtype=np.uint32))
    mask = np.uint32((1 << width) - 1)
    lo, hi = (words >> sh) & mask, (words >> (sh + 16)) & mask
    codes = np.stack([lo, hi], axis=-1).reshape(n, -1)
    if w.bits == 3:
        hw = w.h.reshape(n, -1, 1)
        sh1 = np.arange(16, dtype=np.uint32)
        top = np.stack([(hw >> sh1) & 1, (hw >> (sh1 + 16)) & 1], axis=-1).reshape(n, -1)
        codes = codes | (top << 2)
    return codes[:, :w.k].astype(np.uint8)


def reference_gemv(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                   block: int) -> np.ndarray:
    """``y[n] = Σ_k x[k]·(q[n,k] − z[n,k//block])·s[n,k//block]`` in float64 (plain numpy)."""
    n, k = codes.shape
    g = np.arange(k) // block
    w = (codes.astype(np.float64) - zeros[:, g].astype(np.float64)) * scales[:, g].astype(np.float64)
    return w @ np.asarray(x, np.float64)


def _byte_planes(codes: np.ndarray, width: int) -> np.ndarray:
    """codes ``[N, M·4·p]`` (p = 8/width planes a byte) → uint32 ``[N, M]``: code ``4i + b`` of a word's
    ``4p`` codes at bits ``8b + width·i`` (one mask of plane i gives 4 codes in the 4 bytes, in order)."""
    n = codes.shape[0]
    p = 8 // width
    c = codes.astype(np.uint32).reshape(n, -1, p, 4)
    sh = width * np.arange(p, dtype=np.uint32)[:, None] + 8 * np.arange(4, dtype=np.uint32)[None, :]
    return (c << sh).sum(axis=(-2, -1), dtype=np.uint32)


def to_q8_layout(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block: int) -> GpuWeights:
    """codes ``[N, K]`` → the layout of ``q8.cu`` / ``step.cu`` (int8-activation kernels): the same bits a
    code; a 4-bit word holds codes 8j..8j+7 (low nibbles 8j+b, high nibbles 8j+4+b), a 2-bit word (and the
    low bits of 3-bit codes) codes 16j..16j+15 at byte b bits 2p = code 16j+4p+b, the 3-bit high-bit word
    codes 32i..32i+31 at byte b bit p = code 32i+4p+b."""
    return _to_layout(codes, scales, zeros, bits, block, _byte_planes)


def codes_from_q8_layout(w: GpuWeights) -> np.ndarray:
    """The codes ``[N, K]`` that a :func:`to_q8_layout` result holds (its inverse, for checks)."""
    def planes(words, width):
        p = 8 // width
        sh = width * np.arange(p, dtype=np.uint32)[:, None] + 8 * np.arange(4, dtype=np.uint32)[None, :]
        return ((words.reshape(w.n, -1, 1, 1) >> sh) & np.uint32((1 << width) - 1)).reshape(w.n, -1)

    codes = planes(w.a, 4 if w.bits == 4 else 2)
    if w.bits == 3:
        codes = codes | (planes(w.h, 1) << 2)
    return codes[:, :w.k].astype(np.uint8)
