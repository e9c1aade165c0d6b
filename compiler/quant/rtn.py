"""Round-to-nearest grouped weight quantization (numpy): the one scale/zero-point/code core, and
the exact storage cost of its result in ORT's ``MatMulNBits`` layout.

A linear's weight is ``W[K, N]`` (``y = x·W``).  Groups run along K (the reduction axis), one per
``group`` consecutive input channels of one output column, as ORT's ``MatMulNBits`` blocks do;
``group=0`` (or a group ≥ K) means one group per column (per-channel), stored as one block of the
next power of two ≥ K (MatMulNBits' block sizes are powers of two ≥ 16), the padding counted.
:func:`grouped` zero-pads K to whole blocks; the zeros never move a group's parameters, which
always keep 0 in range.  With ``b`` bits, codes ``q ∈ [0, 2^b − 1]``::

    asymmetric: scale = (max(w,0) − min(w,0)) / (2^b − 1),  zp = clip(round(−min(w,0) / scale), 0, 2^b − 1)
    symmetric:  scale = v / −2^(b−1), zp = 2^(b−1), v the entry of largest magnitude (MLAS' rule:
                v is exact and the full code range is used)
    q = clip(round(W / scale) + zp, 0, 2^b − 1),   Ŵ = (q − zp) · scale

An all-zero group gets scale 1.  :func:`rtn_params` computes in the grouped array's float dtype:
``quantize_rtn``/``fake_quant``/``pack`` use float32 asymmetric parameters (byte-identical to ORT's
``MatMulNBitsQuantizer``); the ``quantize-weights`` pass (``lowbit.quant.gptq``) uses
float64 ones, with its clip search (a range factor ``shrink``) and GPTQ on top of this core.

The storage format whose bytes :func:`storage_bytes` counts is MatMulNBits' (``bits`` packed
densely, little end first, each block padded to whole bytes): ``B`` uint8 ``[N, n_blocks,
ceil(g·b/8)]``, ``scales`` ``[N·n_blocks]`` in the weight's float type, ``zero_points`` uint8
``[N, ceil(n_blocks·b/8)]``.  3 bits (which MatMulNBits refuses) is counted as the
``quantize-weights`` pass writes it for ``lowbit.MatMul3Bit``: ``B`` uint8 ``[N, ⌈K/8⌉·3]`` (8
codes per 3 bytes along the unpadded K), ``scales`` ``[N, n_blocks]``, ``zero_points`` uint8
``[N, n_blocks]``.  ``bits=16`` keeps the float weight.  :func:`pack` builds those arrays, so the count is
checked against real buffers rather than asserted.
"""

from __future__ import annotations

import numpy as np

__all__ = ["blocks", "grouped", "rtn_params", "encode", "decode", "quantize_rtn", "dequantize_rtn",
           "fake_quant", "storage_bytes", "pack", "FLOAT_BITS"]

FLOAT_BITS = 16  # the annotation value meaning "keep the float weight"


def blocks(k: int, group: int) -> tuple[int, int]:
    """(block length, number of blocks); per-channel is one block of MatMulNBits' power-of-two size ≥ 16."""
    if group <= 0 or group >= k:
        return max(16, 1 << (k - 1).bit_length()), 1
    return group, -(-k // group)


def grouped(w: np.ndarray, group: int, dtype) -> np.ndarray:
    """``w[K, N]`` → ``[n_blocks, g, N]`` in ``dtype``, zero-padded at the end of K."""
    k, n = w.shape
    g, nb = blocks(k, group)
    wp = np.zeros((nb * g, n), dtype)
    wp[:k] = w
    return wp.reshape(nb, g, n)


def rtn_params(wg: np.ndarray, bits: int, symmetric: bool = False, shrink: float = 1.0):
    """Scale and zero point ``[n_blocks, N]`` of ``wg[n_blocks, g, N]`` in its dtype; range × ``shrink``."""
    dt = wg.dtype.type
    one, shrink = dt(1), dt(shrink)
    qmax = (1 << bits) - 1
    if symmetric:
        idx = np.abs(wg).argmax(axis=1)
        v = np.take_along_axis(wg, idx[:, None, :], axis=1)[:, 0, :] * shrink
        half = 1 << (bits - 1)
        scale = v / -half
        zp = np.full(scale.shape, half, wg.dtype)
    else:
        lo = np.minimum(wg.min(axis=1), 0) * shrink  # keep 0 exactly representable
        hi = np.maximum(wg.max(axis=1), 0) * shrink
        scale = (hi - lo) / qmax
        zp = np.clip(np.round(-lo / np.where(scale == 0, one, scale)), 0, qmax)
    return np.where(scale == 0, one, scale), zp  # an all-zero group: any scale is exact


def encode(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``clip(round(w / scale) + zp, 0, 2^b − 1)`` as floats (arguments broadcast)."""
    return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 1)


def decode(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """``Ŵ = (q − zp)·scale`` in the scale's dtype (arguments broadcast)."""
    dt = scale.dtype
    return (q.astype(dt) - zp.astype(dt)) * scale


def quantize_rtn(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w[K, N]`` → ``(q [nb, g, N] uint8, scale [nb, N] float32, zp [nb, N] uint8)``; K is zero-padded."""
    if not 1 <= bits <= 8:
        raise ValueError(f"rtn: bits must be in 1..8, got {bits}")
    k, n = w.shape
    wg = grouped(w, group, np.float32)
    scale, zp = rtn_params(wg, bits)
    q = encode(wg, scale[:, None, :], zp[:, None, :], bits).astype(np.uint8)
    q.reshape(-1, n)[k:] = 0  # padding rows hold 0, as ORT writes them
    return q, scale, zp.astype(np.uint8)


def dequantize_rtn(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int) -> np.ndarray:
    """``Ŵ[K, N]`` from :func:`quantize_rtn`'s blocks (computed in the scale's dtype)."""
    nb, g, n = q.shape
    return decode(q, scale[:, None, :], zp[:, None, :]).reshape(nb * g, n)[:k]


def fake_quant(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Ŵ: what the quantized layer computes with (float32, same shape); bits=16 returns ``w``."""
    if bits >= FLOAT_BITS:
        return np.asarray(w, np.float32)
    return dequantize_rtn(*quantize_rtn(np.asarray(w, np.float32), bits, group), w.shape[0])


def storage_bytes(k: int, n: int, bits: int, group: int, float_bytes: int = 4) -> int:
    """Bytes a ``[K, N]`` weight occupies in the written file at ``bits``/``group`` (see module doc)."""
    if bits >= FLOAT_BITS:
        return k * n * float_bytes
    g, nb = blocks(k, group)
    if bits == 3:  # lowbit.MatMul3Bit: codes 8 per 3 bytes along unpadded K, one uint8 zero point per group
        return n * (-(-k // 8)) * 3 + n * nb * float_bytes + n * nb
    data = n * nb * (-(-g * bits // 8))
    scales = n * nb * float_bytes
    zero_points = n * (-(-nb * bits // 8))
    return data + scales + zero_points


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``values`` densely, ``bits`` each, little end first."""
    lead, m = values.shape[:-1], values.shape[-1]
    bitplanes = ((values[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(*lead, m * bits)
    pad = (-bitplanes.shape[-1]) % 8
    if pad:
        bitplanes = np.concatenate([bitplanes, np.zeros((*lead, pad), np.uint8)], axis=-1)
    return np.packbits(bitplanes, axis=-1, bitorder="little")


def pack(w: np.ndarray, bits: int, group: int, float_dtype=np.float32) -> dict[str, np.ndarray]:
    """The arrays the written file holds for ``w`` (MatMulNBits layout; 3 bits: ``lowbit.MatMul3Bit``'s);
    their nbytes sum to :func:`storage_bytes`."""
    if bits >= FLOAT_BITS:
        return {"weight": np.asarray(w, float_dtype)}
    q, scale, zp = quantize_rtn(np.asarray(w, np.float32), bits, group)
    k, n = w.shape
    if bits == 3:  # lowbit.MatMul3Bit's inputs, as quantize-weights writes them
        from lowbit.ops.float_ops import pack3

        codes = np.ascontiguousarray(q.reshape(-1, n)[:k].T)
        return {"B": pack3(codes), "scales": np.ascontiguousarray(scale.T).astype(float_dtype),
                "zero_points": np.ascontiguousarray(zp.T)}
    data = _pack_bits(np.ascontiguousarray(q.transpose(2, 0, 1)), bits)  # [N, nb, blob]
    zpt = np.ascontiguousarray(zp.T)  # [N, nb]
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte and zpt.shape[1] % per_byte:  # unused slots hold the default zero point, as ORT writes them
        fill = np.full((n, per_byte - zpt.shape[1] % per_byte), 1 << (bits - 1), np.uint8)
        zpt = np.concatenate([zpt, fill], axis=1)
    return {"B": data, "scales": scale.T.reshape(-1).astype(float_dtype),
            "zero_points": _pack_bits(zpt, bits).reshape(n, -1)}
