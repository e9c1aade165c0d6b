"""Round-to-nearest grouped weight quantization (numpy) and the exact storage cost of its result.

A linear's weight is ``W[K, N]`` (``y = x·W``).  Groups run along K (the reduction axis), one per
``group`` consecutive input channels of one output column, as ORT's ``MatMulNBits`` blocks do;
``group=0`` means one group per column (per-channel), stored as one block of the next power of
two ≥ K (MatMulNBits' block sizes are powers of two ≥ 16), the padding counted.  Asymmetric min/max RTN::

    scale = (max - min) / (2^b - 1),  zp = clip(round(-min / scale), 0, 2^b - 1)
    q = clip(round(W / scale) + zp, 0, 2^b - 1),   Ŵ = (q - zp) · scale

The storage format whose bytes :func:`storage_bytes` counts is MatMulNBits' (``bits`` packed
densely, little end first, each block padded to whole bytes): ``B`` uint8 ``[N, n_blocks,
ceil(g·b/8)]``, ``scales`` ``[N·n_blocks]`` in the weight's float type, ``zero_points`` uint8
``[N, ceil(n_blocks·b/8)]``.  3 bits (which MatMulNBits refuses) is counted in the same dense
layout.  ``bits=16`` keeps the float weight.  :func:`pack` builds those arrays, so the count is
checked against real buffers rather than asserted.
"""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_rtn", "dequantize_rtn", "fake_quant", "storage_bytes", "pack", "FLOAT_BITS"]

FLOAT_BITS = 16  # the annotation value meaning "keep the float weight"


def _blocks(k: int, group: int) -> tuple[int, int]:
    """(block length, number of blocks); per-channel is one block of MatMulNBits' power-of-two size ≥ 16."""
    if group <= 0 or group >= k:
        return max(16, 1 << (k - 1).bit_length()), 1
    return group, -(-k // group)


def quantize_rtn(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w[K, N]`` → ``(q [nb, g, N] uint8, scale [nb, N] float32, zp [nb, N] uint8)``; K is zero-padded."""
    if not 1 <= bits <= 8:
        raise ValueError(f"rtn: bits must be in 1..8, got {bits}")
    k, n = w.shape
    g, nb = _blocks(k, group)
    wp = np.zeros((nb * g, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(nb, g, n)
    valid = (np.arange(nb * g) < k).reshape(nb, g, 1)
    lo = np.minimum(np.where(valid, blocks, np.inf).min(axis=1), 0.0)  # keep 0 exactly representable
    hi = np.maximum(np.where(valid, blocks, -np.inf).max(axis=1), 0.0)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[:, None, :]) + zp[:, None, :], 0, qmax).astype(np.uint8)
    q[~np.broadcast_to(valid, q.shape)] = 0  # padding rows hold 0, as ORT writes them
    return q, scale, zp


def dequantize_rtn(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int) -> np.ndarray:
    nb, g, n = q.shape
    w = (q.astype(np.float32) - zp[:, None, :].astype(np.float32)) * scale[:, None, :]
    return w.reshape(nb * g, n)[:k]


def fake_quant(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Ŵ: what the quantized layer computes with (float32, same shape); bits=16 returns ``w``."""
    if bits >= FLOAT_BITS:
        return np.asarray(w, np.float32)
    return dequantize_rtn(*quantize_rtn(np.asarray(w, np.float32), bits, group), w.shape[0])


def storage_bytes(k: int, n: int, bits: int, group: int, float_bytes: int = 4) -> int:
    """Bytes a ``[K, N]`` weight occupies in the written file at ``bits``/``group`` (see module doc)."""
    if bits >= FLOAT_BITS:
        return k * n * float_bytes
    g, nb = _blocks(k, group)
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
    """The arrays the written file holds for ``w`` (MatMulNBits layout); their nbytes sum to storage_bytes."""
    if bits >= FLOAT_BITS:
        return {"weight": np.asarray(w, float_dtype)}
    q, scale, zp = quantize_rtn(np.asarray(w, np.float32), bits, group)
    n = w.shape[1]
    data = _pack_bits(np.ascontiguousarray(q.transpose(2, 0, 1)), bits)  # [N, nb, blob]
    zpt = np.ascontiguousarray(zp.T)  # [N, nb]
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte and zpt.shape[1] % per_byte:  # unused slots hold the default zero point, as ORT writes them
        fill = np.full((n, per_byte - zpt.shape[1] % per_byte), 1 << (bits - 1), np.uint8)
        zpt = np.concatenate([zpt, fill], axis=1)
    return {"B": data, "scales": scale.T.reshape(-1).astype(float_dtype),
            "zero_points": _pack_bits(zpt, bits).reshape(n, -1)}
