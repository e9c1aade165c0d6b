"""Independent numpy dequantization of GGUF block formats, written from ggml's block layouts.

Each function takes the raw bytes of one tensor row-major as ``uint8 [rows, bytes_per_row]`` and
returns ``float32 [rows, elements]``.  No code from the ``gguf`` package is used.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEQUANT", "BLOCK"]


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def _blocks(raw: np.ndarray, size: int) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1, size)


def q8_0(raw):
    b = _blocks(raw, 34)
    d = _f16(b[..., 0:2])
    return (d * b[..., 2:].view(np.int8).astype(np.float32)).reshape(raw.shape[0], -1)


def _nibbles(qs):
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float32)  # [.., 32]: low then high


def q4_0(raw):
    b = _blocks(raw, 18)
    return (_f16(b[..., 0:2]) * (_nibbles(b[..., 2:]) - 8)).reshape(raw.shape[0], -1)


def q4_1(raw):
    b = _blocks(raw, 20)
    return (_f16(b[..., 0:2]) * _nibbles(b[..., 4:]) + _f16(b[..., 2:4])).reshape(raw.shape[0], -1)


def _high_bits(qh_bytes):
    qh = qh_bytes.copy().view(np.uint32)  # [.., 1]
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)  # bit j for element j


def q5_0(raw):
    b = _blocks(raw, 22)
    q = _nibbles(b[..., 6:]) + 16 * _high_bits(b[..., 2:6])
    return (_f16(b[..., 0:2]) * (q - 16)).reshape(raw.shape[0], -1)


def q5_1(raw):
    b = _blocks(raw, 24)
    q = _nibbles(b[..., 8:]) + 16 * _high_bits(b[..., 4:8])
    return (_f16(b[..., 0:2]) * q + _f16(b[..., 2:4])).reshape(raw.shape[0], -1)


def _scale_min_k4(s):  # s: [.., 12] uint8 → 8 scales, 8 mins (6 bits each)
    s = s.astype(np.int32)
    sc, mn = np.zeros(s.shape[:-1] + (8,), np.int32), np.zeros(s.shape[:-1] + (8,), np.int32)
    for j in range(8):
        if j < 4:
            sc[..., j], mn[..., j] = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def q4_k(raw):
    b = _blocks(raw, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])
    qs = b[..., 16:]
    out = []
    for c in range(4):  # 64 values per chunk: 32 low nibbles (sub-block 2c), 32 high (2c+1)
        chunk = qs[..., 32 * c:32 * c + 32]
        for sub, q in ((2 * c, chunk & 0xF), (2 * c + 1, chunk >> 4)):
            out.append(d * sc[..., sub:sub + 1] * q.astype(np.float32) - dmin * mn[..., sub:sub + 1])
    return np.concatenate(out, axis=-1).reshape(raw.shape[0], -1)


def q6_k(raw):
    b = _blocks(raw, 210)
    ql, qh = b[..., 0:128].astype(np.int32), b[..., 128:192].astype(np.int32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    y = np.zeros(b.shape[:-1] + (256,), np.float32)
    for n in range(2):
        L, H, S = ql[..., 64 * n:64 * n + 64], qh[..., 32 * n:32 * n + 32], sc[..., 8 * n:8 * n + 8]
        for l in range(32):
            i = l // 16
            q1 = ((L[..., l] & 0xF) | (((H[..., l] >> 0) & 3) << 4)) - 32
            q2 = ((L[..., l + 32] & 0xF) | (((H[..., l] >> 2) & 3) << 4)) - 32
            q3 = ((L[..., l] >> 4) | (((H[..., l] >> 4) & 3) << 4)) - 32
            q4 = ((L[..., l + 32] >> 4) | (((H[..., l] >> 6) & 3) << 4)) - 32
            base = 128 * n
            y[..., base + l] = d[..., 0] * S[..., i] * q1
            y[..., base + l + 32] = d[..., 0] * S[..., i + 2] * q2
            y[..., base + l + 64] = d[..., 0] * S[..., i + 4] * q3
            y[..., base + l + 96] = d[..., 0] * S[..., i + 6] * q4
    return y.reshape(raw.shape[0], -1)


DEQUANT = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q4_K": q4_k, "Q6_K": q6_k}
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
         "Q4_K": (256, 144), "Q6_K": (256, 210)}
