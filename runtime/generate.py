"""Text generation through the KV cache: ``lowbit.runtime.generate(model, prompt)``.

One prefill step runs the whole prompt through the KV graph, then one decode step per new token
feeds the chosen token and the cache (kept in ORT, see :mod:`.kv_session`).  Greedy by default;
``temperature > 0`` samples from ``softmax(logits / T)`` restricted to the ``top_k`` most likely
tokens and to the smallest set whose probability reaches ``top_p`` (nucleus), with a seeded numpy
generator.  Generation stops at ``max_new_tokens`` or at the tokenizer's end-of-sequence token.

Text is streamed as it becomes final: the generated ids are decoded as a whole and the new suffix
is yielded, held back while it ends in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from lowbit.errors import LowbitError

from .kv_session import KVSession
from .textcodec import TextCodec, load_codec, render_chat

__all__ = ["generate", "Generation", "GeneratedToken", "GenerationStats", "sample_next"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str          # the text this token made final (may be "" while a UTF-8 sequence is incomplete)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    stopped_by: str = ""

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.mean(self.decode_ms)) if self.decode_ms else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token if self.decode_ms else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "prefill_ms": self.prefill_ms,
                "decode_ms_per_token": self.decode_ms_per_token, "tokens_per_s": self.tokens_per_s,
                "stopped_by": self.stopped_by}


def sample_next(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0) -> int:
    """Greedy (``temperature == 0``) or temperature / top-k / top-p sampling from one row of logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class Generation:
    """Iterate to get :class:`GeneratedToken` as they are produced; ``stats``/``text`` afterwards."""

    def __init__(self, session: KVSession, codec: TextCodec, prompt_ids: list[int], *, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None, stop_at_eos: bool):
        self.session, self.codec, self.prompt_ids = session, codec, list(prompt_ids)
        self.max_new_tokens, self.stop_at_eos = max_new_tokens, stop_at_eos
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self._emitted = ""
        self._prefix = codec.decode(self.prompt_ids)  # decode in context: tokenizers strip a leading space

    @property
    def text(self) -> str:
        return self._decode()

    def _decode(self) -> str:
        full = self.codec.decode(self.prompt_ids + self.ids)
        return full[len(self._prefix):] if full.startswith(self._prefix) else self.codec.decode(self.ids)

    def _new_text(self, final: bool) -> str:
        text = self._decode()
        if not final and text.endswith("\ufffd"):
            return ""
        new = text[len(self._emitted):]  # a tokenizer that re-spaces earlier text still emits only the rest
        self._emitted = text
        return new

    def __iter__(self):
        s = self.session
        s.reset()
        if not self.prompt_ids:
            raise LowbitError("the prompt is empty and the tokenizer adds no BOS", hint="give --prompt TEXT")
        t0 = time.perf_counter()
        logits = s.step(self.prompt_ids)[0]
        self.stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        eos = set(self.codec.eos_ids) if self.stop_at_eos else set()
        for i in range(self.max_new_tokens):
            nxt = sample_next(logits, self.rng, self.temperature, self.top_k, self.top_p)
            if nxt in eos:
                self.stats.stopped_by = "eos"
                break
            self.ids.append(nxt)
            self.stats.new_tokens += 1
            yield GeneratedToken(nxt, self._new_text(final=False))
            if i + 1 == self.max_new_tokens:
                self.stats.stopped_by = "max_new_tokens"
                break
            t0 = time.perf_counter()
            logits = s.step([nxt])[0]
            self.stats.decode_ms.append((time.perf_counter() - t0) * 1e3)
        tail = self._new_text(final=True)
        if tail:
            yield GeneratedToken(-1, tail)


def generate(model, prompt: str | list[dict] | list[int] = "", *, tokenizer=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             chat: bool = False, stop_at_eos: bool = True, threads: int | None = None) -> Generation:
    """Generate from ``model`` (a KV-graph path / ``ir.Model`` / :class:`KVSession`).

    ``prompt`` is text, a list of chat messages (``[{"role": ..., "content": ...}]``, rendered with
    the tokenizer's chat template), or token ids.  ``chat=True`` wraps a text prompt as one user
    message.  Returns a :class:`Generation`: iterate it for tokens as they come."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or max_new_tokens < 0:
        raise LowbitError("sampling options out of range",
                          hint="temperature >= 0, top_k >= 0, 0 < top_p <= 1, max_new_tokens >= 0")
    session = model if isinstance(model, KVSession) else KVSession(model, threads=threads)
    codec = tokenizer if isinstance(tokenizer, TextCodec) else None
    if codec is None:
        source = tokenizer or _recorded_tokenizer(session)
        if source is None:
            raise LowbitError("the model records no tokenizer", hint="pass tokenizer=PATH (--tokenizer)")
        codec = load_codec(source)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        ids = codec.encode(render_chat(codec, prompt), add_bos=False)
    elif isinstance(prompt, list):
        ids = [int(i) for i in prompt]
    elif chat:
        ids = codec.encode(render_chat(codec, [{"role": "user", "content": prompt}]), add_bos=False)
    else:
        ids = codec.encode(prompt)
    return Generation(session, codec, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop_at_eos=stop_at_eos)


def _recorded_tokenizer(session: KVSession) -> str | None:
    meta = session.session.get_modelmeta().custom_metadata_map
    return meta.get("lowbit.tokenizer")
