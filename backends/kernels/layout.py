"""Repack lowbit's weight formats into the CPU kernels' layout (see ``lowbit_cpu.c``'s header).

Input: unsigned codes ``c`` [N, K] (uint8, < 2^bits), scales ``s`` [N, ng] float32 and zero points
``z`` [N, ng] uint8 (None: 2^(bits−1)), for ``W[k, n] = (c[n, k] − z[n, g])·s[n, g]``, g = k // G.
This is what MatMulNBits, ``lowbit.MatMul3Bit`` and a blocked DequantizeLinear hold, read without
loss.  Output (:class:`Packed`): rows in tiles of 16, K padded to ``ng·G`` with code 0 (its activations
are 0), codes as bit-sliced 64-byte vectors per (tile, group); 3 bits stay 3 bits (a 2-bit plane plus
a 1-bit plane).  Only numpy: this module also runs where lowbit's compiler is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Packed", "repack", "TILE", "BITS", "packed_bytes"]

TILE = 16
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Packed:
    """One linear in the kernels' layout: ``codes`` uint8 [NT, nb, bits, 2Gc] in blocks of Gc = G (2/3-bit
    G = 16: Gc = 32, two groups a block), ``scales`` float32 [NT, ng, 16], ``zeros`` uint8 [NT, ng, 16]
    (ng = nb·Gc/G; the group is Kp / ng); y = x[..., :K] @ W."""

    bits: int
    k: int
    n: int
    group: int
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    @property
    def kp(self) -> int:
        return self.codes.shape[1] * self.codes.shape[3] // 2  # code blocks × their K

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes


def _code_block(bits: int, group: int) -> int:
    """K of one block of codes: the group, or two groups of 16 for 2/3-bit codes (the kernels' pair mode)."""
    return 32 if group == 16 and bits <= 3 else group


def packed_bytes(k: int, n: int, bits: int, group: int) -> int:
    """Bytes a [K, N] linear takes in this layout (what one decode step reads)."""
    gc = _code_block(bits, group)
    nt, nb = -(-n // TILE), -(-k // gc)
    return nt * nb * (2 * gc * bits + TILE * 5 * (gc // group))


def _bitslice(c: np.ndarray, b: int) -> np.ndarray:
    """c [NT, 16, ng, G] codes of b ∈ {2, 4, 8} bits → [NT, ng, G/(4S), 64] bytes, S = 8/b steps a byte."""
    nt, _, ng, g = c.shape
    s_ = 8 // b
    v = c.reshape(nt, TILE, ng, g // (4 * s_), s_, 4).transpose(0, 2, 3, 1, 5, 4)  # [NT, ng, nv, r, j, s]
    out = np.zeros(v.shape[:-1], np.uint8)
    for s in range(s_):
        out |= (v[..., s] << (b * s)).astype(np.uint8)
    return out.reshape(nt, ng, -1, 64)


def repack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group: int) -> Packed:
    """Kernel layout of codes [N, K], scales/zeros [N, ng] with ``group`` inputs per scale (see module doc)."""
    if bits not in BITS:
        raise ValueError(f"lowbit-cpu kernels: {bits}-bit weights are not supported (use {BITS})")
    n, k = codes.shape
    ng = -(-k // group)
    gc = _code_block(bits, group)
    if gc % 32:
        raise ValueError(f"lowbit-cpu kernels: group {group} is not a multiple of 32 (or 16 for 2/3 bits)")
    if scales.shape != (n, ng) or (zeros is not None and zeros.shape != (n, ng)):
        raise ValueError(f"lowbit-cpu kernels: scales/zeros must be [N, K/group] = [{n}, {ng}], got {scales.shape}")
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"lowbit-cpu kernels: codes exceed {bits} bits")
    nt, nb = -(-n // TILE), -(-k // gc)
    c = np.zeros((nt * TILE, nb * gc), np.uint8)
    c[:n, :k] = codes
    c = c.reshape(nt, TILE, nb, gc)
    if bits == 3:
        lo = _bitslice(c & 3, 2)  # [NT, nb, gc/16, 64]
        # high bits: one 64-byte vector per pair of low-plane vectors (v = 2w + u); byte 4r+j, bit 4u+s
        h = ((c >> 2) & 1).reshape(nt, TILE, nb, gc // 32, 2, 4, 4).transpose(0, 2, 3, 1, 6, 4, 5)  # [.., w, r, j, u, s]
        hi = np.packbits(h.reshape(nt, nb, gc // 32, 64, 8), axis=-1, bitorder="little")
        flat = np.concatenate([lo.reshape(nt, nb, -1), hi.reshape(nt, nb, -1)], axis=-1)
    else:
        flat = _bitslice(c, bits).reshape(nt, nb, -1)
    ngp = nb * gc // group  # scale groups, a padded one (scale 0) where K needs a whole block
    z = np.full((n, ng), 1 << (bits - 1), np.uint8) if zeros is None else zeros.astype(np.uint8)
    pad = ((0, nt * TILE - n), (0, ngp - ng))
    sp = np.pad(scales.astype(np.float32), pad).reshape(nt, TILE, ngp).transpose(0, 2, 1)
    zp = np.pad(z, pad).reshape(nt, TILE, ngp).transpose(0, 2, 1)
    return Packed(bits, k, n, group, np.ascontiguousarray(flat.reshape(nt, nb, bits, 2 * gc)),
                  np.ascontiguousarray(sp), np.ascontiguousarray(zp))
