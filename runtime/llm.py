"""Causal-LM evaluation: perplexity on text and greedy generation, for any ONNX causal LM.

Perplexity follows llama2.c's training layout: each story is ``BOS + tokens`` (no EOS), the
stories are concatenated into one stream, and the stream is cut into windows of ``seq_len + 1``
tokens overlapping by one; every token after the first of a window is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Perplexity", "perplexity", "perplexity_cached", "greedy_generate", "token_stream", "log_softmax"]


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood, nats/token
    tokens: int

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_stream(tokenizer, stories: list[str]) -> np.ndarray:
    ids: list[int] = []
    for s in stories:
        ids.extend(tokenizer.encode(s, bos=True))
    return np.array(ids, dtype=np.int64)


def _input_name(session) -> str:
    return session.get_inputs()[0].name


def _window_feed(session, name: str, ids: np.ndarray) -> dict:
    """The feed for whole windows ``ids`` [batch, seq]: the token input, or a KV graph's prefill inputs."""
    inputs = session.get_inputs()
    if not any(i.name.startswith("past_key_values.") for i in inputs):
        return {name: ids}
    b, s = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()}
    types = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
             "tensor(float16)": np.float16}
    for i in inputs:
        if i.name.startswith("past_key_values."):
            dims = [b if k == 0 else (d if isinstance(d, int) else 0) for k, d in enumerate(i.shape)]
            feed[i.name] = np.zeros(dims, types[i.type])
    return {k: v for k, v in feed.items() if k in {i.name for i in inputs}}


def perplexity(session, stream: np.ndarray, seq_len: int = 512, batch: int = 8, progress: bool = False) -> Perplexity:
    """Mean NLL of ``stream`` under ``session`` (anything with ORT's ``run``)."""
    from tqdm.auto import tqdm

    windows = [stream[i : i + seq_len + 1] for i in range(0, max(len(stream) - 1, 1), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    name = _input_name(session)
    total, count = 0.0, 0
    # Windows of equal length batch together; the last (shorter) one runs alone.
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    chunks, cur = [], []
    for i in order:
        if cur and (len(windows[cur[0]]) != len(windows[i]) or len(cur) == batch):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    for chunk in tqdm(chunks, desc="perplexity", disable=not progress, leave=False):
        arr = np.stack([windows[i] for i in chunk])
        feed = _window_feed(session, name, arr[:, :-1])
        logits = session.run(["logits"] if "attention_mask" in feed else None, feed)[0]
        lp = log_softmax(logits)
        tgt = arr[:, 1:]
        total -= float(np.take_along_axis(lp, tgt[..., None], axis=-1).sum())
        count += tgt.size
    return Perplexity(total / max(count, 1), count)


def greedy_generate(session, prompt: list[int], steps: int, eos: int | None = 2) -> list[int]:
    seq = list(prompt)
    name = _input_name(session)
    for _ in range(steps):
        logits = session.run(None, {name: np.array([seq], dtype=np.int64)})[0][0, -1]
        nxt = int(np.argmax(logits))
        if eos is not None and nxt == eos:
            break
        seq.append(nxt)
    return seq


def perplexity_cached(session, stream: np.ndarray, seq_len: int = 512, progress: bool = False) -> Perplexity:
    """The same windows and scores as :func:`perplexity`, computed token by token through the KV cache.

    ``session`` is a :class:`lowbit.runtime.kv_session.KVSession`; each window starts from an empty
    cache, so the result equals whole-window perplexity of the same graph up to float rounding."""
    from tqdm.auto import tqdm

    windows = [stream[i : i + seq_len + 1] for i in range(0, max(len(stream) - 1, 1), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity (cache)", disable=not progress, leave=False):
        session.reset()
        for t in range(len(w) - 1):
            lp = log_softmax(session.step(w[t : t + 1])[0])
            total -= float(lp[w[t + 1]])
            count += 1
    return Perplexity(total / max(count, 1), count)
