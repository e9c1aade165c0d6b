"""Launching ``step.cu``: one whole Llama decode step (batch 1) as one persistent kernel, through CuPy.

:class:`DecodeStep` owns the device buffers (residual ``x`` fp32, ``qkv``, ``act``, ``logits``, the fp16 KV
caches, the barrier counter) and the table of every linear (q8 layout, :func:`~.layout.to_q8_layout`)
that the kernel walks.  Its gate/up linear has its rows interleaved (gate 0, up 0, gate 1, ...).
``step()`` = zero the barrier + one launch of one block per multiprocessor; both go into a CUDA graph.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from .gemv import build_module
from .layout import CODES_PER_STEP

__all__ = ["DecodeStep", "StepShape", "DeviceLinear"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepShape:
    dim: int = 2048
    hidden: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    max_ctx: int = 64
    block: int = 128


@dataclass
class DeviceLinear:
    """One linear on the device in the q8 layout: a [N, Kp/CPS, 4] u32, h [N, Kp/64, 2] u32 or None,
    s [N, G] f32, z [N, G] u8."""

    bits: int
    a: object
    h: object
    s: object
    z: object
    block: int

    @property
    def n(self) -> int:
        return int(self.a.shape[0])

    @property
    def k_padded(self) -> int:
        return int(self.a.shape[1]) * CODES_PER_STEP[self.bits]

    @property
    def nbytes(self) -> int:
        return int(self.a.nbytes + (0 if self.h is None else self.h.nbytes) + self.s.nbytes + self.z.nbytes)

    def packed(self) -> bytes:
        """The ``Lin`` struct of step.cu (4 pointers, N, K, G, gs)."""
        h = self.h.data.ptr if self.h is not None else self.a.data.ptr
        return struct.pack("<QQQQiiii", self.a.data.ptr, h, self.s.data.ptr, self.z.data.ptr, self.n,
                           self.k_padded, int(self.s.shape[1]), self.block)


class DecodeStep:
    """``layers``: per layer a dict of DeviceLinear ``qkv``, ``o``, ``gu`` (interleaved), ``down`` and
    float32 device norms ``n1``, ``n2``; ``head`` DeviceLinear; ``nf`` final norm; ``emb`` fp16 [vocab, dim]."""

    def __init__(self, cp, shape: StepShape, bits: int, layers, head, nf, emb, eps=1e-5, theta=10000.0,
                 prefetch: bool = True):
        s = shape
        if s.dim % 64 or s.hidden % 64 or s.heads * 64 > 4096 or s.kv_heads * 64 > 1024 or max(s.dim, s.hidden) > 8192:
            raise ValueError(f"DecodeStep: shape {s} outside step.cu's limits")
        self.cp, self.shape, self.bits, self.eps, self.theta = cp, s, bits, eps, theta
        self.flags = 1 if prefetch else 0  # step.cu: bit 0 = L2 prefetch of the next phase's weights
        self.layers, self.head, self.nf, self.emb = layers, head, nf, emb
        self.kernel = build_module('#include "step.cu"\n').get_function(f"decode_step_b{bits}")
        self.kc = [cp.zeros((s.kv_heads, s.max_ctx, 64), cp.float16) for _ in layers]
        self.vc = [cp.zeros((s.kv_heads, s.max_ctx, 64), cp.float16) for _ in layers]
        blob = b""
        for d, kc, vc in zip(layers, self.kc, self.vc):
            blob += b"".join(d[n].packed() for n in ("qkv", "o", "gu", "down"))
            blob += struct.pack("<QQQQ", d["n1"].data.ptr, d["n2"].data.ptr, kc.data.ptr, vc.data.ptr)
        import numpy as np

        self.table = cp.asarray(np.frombuffer(blob, np.uint8))
        self.head_table = cp.asarray(np.frombuffer(head.packed(), np.uint8))
        self.x = cp.zeros(s.dim, cp.float32)
        self.qkv = cp.zeros((s.heads + 2 * s.kv_heads) * 64, cp.float32)
        self.act = cp.zeros(s.hidden, cp.float32)
        self.logits = cp.zeros(s.vocab, cp.float32)
        self.bar = cp.zeros(2, cp.uint32)
        self.token = cp.zeros(1, cp.int32)
        self.pos = cp.zeros(1, cp.int32)
        self.blocks = cp.cuda.Device().attributes["MultiProcessorCount"]

    def weight_bytes(self) -> int:
        return sum(d[n].nbytes for d in self.layers for n in ("qkv", "o", "gu", "down")) + self.head.nbytes

    def step(self) -> None:
        """One token (``token``, ``pos`` device scalars) → ``logits``; appends to the KV caches."""
        cp, s = self.cp, self.shape
        self.bar[0] = 0
        self.kernel((self.blocks,), (512,), (
            self.table, self.head_table, self.nf, self.emb, self.token, self.pos, self.x, self.qkv, self.act,
            self.logits, self.bar, cp.int32(len(self.layers)), cp.int32(s.dim), cp.int32(s.heads),
            cp.int32(s.kv_heads), cp.int32(s.max_ctx), cp.float32(self.eps), cp.float32(self.theta), cp.int32(self.flags)))

    def timed_out(self) -> bool:
        """Whether a grid barrier gave up waiting (blocks not all resident) since the buffers were made."""
        return bool(int(self.bar[1].get()) != 0)
