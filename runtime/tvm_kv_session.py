"""A decoding session over a TVM KV-cache artifact (``lowbit.backends.tvm_decoder.lower_kv_tvm``).

The same contract as :class:`lowbit.runtime.kv_session.KVSession` (``step(ids)`` → logits of the last
new token, ``reset()``, ``length``), so :func:`lowbit.runtime.generate.generate` runs it unchanged:
one artifact serves every prompt and past length (the lengths are symbolic in the compiled module).
The ``present.*`` outputs stay TVM tensors on the device and are fed back as the next step's
``past_key_values.*``; only the last position's logits are copied to the host.  TVM is imported
when a session is made, not when lowbit is imported.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

from .kv_session import PAST_PREFIX, PRESENT_PREFIX, KVSession

__all__ = ["TvmKVSession"]

logger = logging.getLogger(__name__)


class _ModelMeta:
    """What ``generate`` reads of an ORT session's metadata (the recorded tokenizer)."""

    def __init__(self, custom: dict):
        self.custom_metadata_map = custom

    def get_modelmeta(self):
        return self


class TvmKVSession(KVSession):
    """Prefill and decode through one TVM artifact of a KV-cache graph (batch 1)."""

    def __init__(self, lib: str | os.PathLike, *, device: str | None = None):
        from .tvm_runner import TvmSession

        self.tvm = TvmSession(lib, device=device)
        meta = self.tvm.meta
        if not meta.get("kv_cache"):
            raise LowbitError(f"{lib}: not a KV-cache TVM artifact", hint="lower it with lower_kv_tvm "
                              "(lowbit compile --kv-cache --backend tvm)")
        tokenizer = meta.get("tokenizer")
        self.session = _ModelMeta({"lowbit.tokenizer": tokenizer} if tokenizer else {})
        self.output_names = self.tvm.output_names
        self.cache = [spec for spec in meta["inputs"] if spec["name"].startswith(PAST_PREFIX)]
        for spec in self.cache:
            present = PRESENT_PREFIX + spec["name"][len(PAST_PREFIX):]
            if present not in self.output_names:
                raise LowbitError(f"cache input '{spec['name']}' has no matching output '{present}'")
        names = set(self.tvm.input_names)
        self.has_mask, self.has_positions = "attention_mask" in names, "position_ids" in names
        self.batch = 1
        self.reset()

    def reset(self) -> None:
        self.length = 0
        self._past = {}
        for spec in self.cache:
            dims = [1 if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(spec["shape"])]
            self._past[spec["name"]] = self.tvm._tensor(np.zeros(dims, spec["dtype"]), self.tvm.device)

    def cache_bytes(self) -> int:
        return int(sum(np.prod(v.shape) * np.dtype(str(v.dtype)).itemsize for v in self._past.values()))

    def step(self, ids, *, last_only: bool = True) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.shape[0] != 1:
            raise LowbitError(f"batch {ids.shape[0]}: the TVM KV session runs one sequence", hint="use batch 1")
        seq = ids.shape[1]
        feeds = {"input_ids": ids, **self._past}
        if self.has_mask:
            feeds["attention_mask"] = np.ones((1, self.length + seq), np.int64)
        if self.has_positions:
            feeds["position_ids"] = np.arange(self.length, self.length + seq, dtype=np.int64)[None, :]
        res = self.tvm.run_device(feeds)
        outs = dict(zip(self.output_names, list(res) if not hasattr(res, "numpy") else [res]))
        self._past = {n: outs[PRESENT_PREFIX + n[len(PAST_PREFIX):]] for n in self._past}
        self.length += seq
        logits = outs["logits"].numpy()
        return logits[:, -1] if last_only else logits


def artifact_tokenizer(meta_path: str | os.PathLike) -> str | None:
    """The tokenizer recorded in an artifact's ``.json`` (or None)."""
    return json.loads(Path(meta_path).read_text()).get("tokenizer")
