"""lowbit.runtime: running compiled models (ORT/TVM sessions, generation, evaluation, references)."""

from __future__ import annotations

from lowbit.runtime.generate import Generation, GeneratedToken, generate
from lowbit.runtime.kv_session import KVSession

__all__ = ["generate", "Generation", "GeneratedToken", "KVSession"]
