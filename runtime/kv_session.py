"""A decoding session over a KV-cache graph: the cache stays in ONNX Runtime between steps.

The graph is the KV form of :mod:`lowbit.frontends.decoder` (inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` and any other
``past_*`` cache tensors a pass added, e.g. the quantized cache's scales; outputs ``logits``
and ``present.*``).  Every ``past_key_values.X`` input is fed from the previous step's
``present.X`` output, whatever its dtype (float32, or uint8 for a quantized cache).

Each step binds its inputs and outputs through an ``IOBinding``: the ``present`` tensors come
back as ``OrtValue`` objects that are bound unchanged as the next step's ``past`` inputs, so the
cache is never copied through numpy; only the logits of the last position are read out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

__all__ = ["KVSession", "is_kv_model", "PAST_PREFIX", "PRESENT_PREFIX"]

logger = logging.getLogger(__name__)

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
           "tensor(int8)": np.int8, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def is_kv_model(input_names) -> bool:
    names = list(input_names)
    return "input_ids" in names and any(n.startswith(PAST_PREFIX) for n in names)


@dataclass(frozen=True)
class _CacheInput:
    name: str
    dtype: type
    shape: tuple  # ints, or None for batch (axis 0) and the past length (the one symbolic non-batch axis)

    def empty(self, batch: int) -> np.ndarray:
        dims = [batch if i == 0 else (0 if d is None else d) for i, d in enumerate(self.shape)]
        return np.zeros(dims, dtype=self.dtype)


class KVSession:
    """Prefill and decode through one ORT session; ``step(ids)`` → logits of the new tokens.

    ``model`` is a path, an ``ir.Model`` or an ``onnxruntime.InferenceSession`` of a KV graph.
    ``last_only`` (default) reads back only the last position's logits (what generation needs).
    """

    def __init__(self, model, *, threads: int | None = None, batch: int = 1):
        import onnxruntime as ort

        if isinstance(model, ort.InferenceSession):
            self.session = model
        else:
            from lowbit.ir.sessions import make_session

            self.session = make_session(model if not isinstance(model, os.PathLike) else str(model), threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if not is_kv_model(inputs):
            raise LowbitError("the model has no KV-cache inputs (input_ids, past_key_values.*)",
                              hint="build the KV-cache form: lowbit.load_model(..., kv_cache=True) or "
                                   "'lowbit compile ... --kv-cache'")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.cache: list[_CacheInput] = []
        for name, meta in inputs.items():
            if not name.startswith(PAST_PREFIX):
                continue
            present = PRESENT_PREFIX + name[len(PAST_PREFIX):]
            if present not in self.output_names:
                raise LowbitError(f"cache input '{name}' has no matching output '{present}'",
                                  hint="the KV graph must return present.X for every past_key_values.X")
            if meta.type not in _DTYPES:
                raise LowbitError(f"cache input '{name}' has unsupported type {meta.type}")
            shape = tuple(d if isinstance(d, int) else None for d in meta.shape)
            self.cache.append(_CacheInput(name, _DTYPES[meta.type], shape))
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        self.batch = batch
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache (start a new sequence)."""
        import onnxruntime as ort

        self.length = 0
        self._past = {c.name: ort.OrtValue.ortvalue_from_numpy(c.empty(self.batch)) for c in self.cache}

    def cache_bytes(self) -> int:
        """Bytes the cache holds now (all layers, K and V, scales included)."""
        total = 0
        for v in self._past.values():
            shape = v.shape()
            total += int(np.prod(shape)) * np.dtype(_DTYPES.get(v.data_type(), np.float32)).itemsize
        return total

    # -- running ---------------------------------------------------------------------------------
    def step(self, ids, *, last_only: bool = True) -> np.ndarray:
        """Feed ``ids`` ([seq] or [batch, seq] int64) after the cached tokens; return their logits.

        Returns [batch, vocab] (``last_only``) or [batch, seq, vocab]."""
        import onnxruntime as ort

        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.shape[0] != self.batch:
            raise LowbitError(f"batch {ids.shape[0]} does not match the session's batch {self.batch}")
        seq = ids.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if self.has_mask:
            binding.bind_cpu_input("attention_mask", np.ones((self.batch, self.length + seq), np.int64))
        if self.has_positions:
            pos = np.broadcast_to(np.arange(self.length, self.length + seq, dtype=np.int64), (self.batch, seq))
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos))
        for name, value in self._past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = dict(zip(self.output_names, binding.get_outputs()))
        self._past = {c.name: outs[PRESENT_PREFIX + c.name[len(PAST_PREFIX):]] for c in self.cache}
        self.length += seq
        logits: ort.OrtValue = outs["logits"]
        arr = logits.numpy()
        return arr[:, -1] if last_only else arr
