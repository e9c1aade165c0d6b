"""A TinyLlama-shape fp32 KV graph written to disk without holding its weights in memory (``benchmarks/decode.py``).

Random weights are generated per tensor on access (:class:`LazyWeights`, deterministic: the Hugging Face folder
for onnxruntime-genai's builder reads the same values), and while the frontend emits the graph every large
initializer goes straight to the external data file (:func:`build_streaming`): peak memory is a few tensors,
not the model (4.4 GB at 22 layers) plus its serialized copy.  Speed only: the weights are random.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

__all__ = ["LazyWeights", "build_streaming"]

_KEYS = ["embed", "head", "q", "k", "v", "o", "w1", "w2", "w3"]


class _Lazy:
    """One random weight, drawn when numpy asks for it (``np.asarray``)."""

    def __init__(self, shape, seed, ones: bool = False):
        self.shape, self.seed, self.ones = tuple(shape), seed, ones

    def __array__(self, dtype=None, copy=None):
        if self.ones:
            a = np.ones(self.shape, np.float32)
        else:
            a = np.random.default_rng(self.seed).standard_normal(self.shape, dtype=np.float32)
            a *= np.float32(1 / np.sqrt(self.shape[-1]))
        return a if dtype is None else a.astype(dtype, copy=False)


class _Stack:
    """``w[key][layer]`` of llama2.c's stacked arrays, one lazy weight per layer."""

    def __init__(self, key: str, shape, seed: int, ones: bool = False):
        self.key, self.shape, self.seed, self.ones = key, tuple(shape), seed, ones

    def __getitem__(self, i: int) -> _Lazy:
        return _Lazy(self.shape, [self.seed, _KEYS.index(self.key) if self.key in _KEYS else 99, i], self.ones)


def LazyWeights(cfg, seed: int = 0) -> dict:  # noqa: N802  (stands in for random_llama_weights' dict)
    """llama2.c's weight dict (``random_llama_weights`` layout) whose arrays are drawn on access."""
    d, h, kv, v = cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    return {"embed": _Lazy((v, d), [seed, 0, 0]), "head": _Lazy((v, d), [seed, 1, 0]),
            "final_norm": _Lazy((d,), 0, ones=True),
            "attn_norm": _Stack("attn_norm", (d,), seed, ones=True), "ffn_norm": _Stack("ffn_norm", (d,), seed, True),
            "q": _Stack("q", (d, d), seed), "k": _Stack("k", (kv, d), seed), "v": _Stack("v", (kv, d), seed),
            "o": _Stack("o", (d, d), seed), "w1": _Stack("w1", (h, d), seed), "w2": _Stack("w2", (d, h), seed),
            "w3": _Stack("w3", (h, d), seed)}


@contextlib.contextmanager
def _streaming_inits(data_path: Path):
    """GraphBuilder.init writes initializers over 64 KiB to ``data_path`` and keeps only a reference."""
    import onnx
    from onnx import helper

    from lowbit.ir.graph_builder import GraphBuilder

    orig = GraphBuilder.init
    with open(data_path, "wb") as f:
        def init(self, name: str, array) -> str:
            arr = np.ascontiguousarray(array)
            if arr.nbytes < 1 << 16:
                return orig(self, name, arr)
            name = self.fresh(name)
            pad = (-f.tell()) % 4096
            f.write(b"\0" * pad)
            offset = f.tell()
            arr.tofile(f)
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape,
                                 data_location=onnx.TensorProto.EXTERNAL)
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            self.inits.append(t)
            return name

        GraphBuilder.init = init
        try:
            yield
        finally:
            GraphBuilder.init = orig


def build_streaming(cfg, weights: dict, path: Path, attention_impl: str = "plain") -> Path:
    """The KV-cache graph of ``build_llama(cfg, weights, kv_cache=True, attention_impl=...)`` at ``path`` +
    ``path.name``.data."""
    import onnx
    import onnx_ir as ir

    from lowbit.frontends.llama2c import build_llama

    path.parent.mkdir(parents=True, exist_ok=True)
    with _streaming_inits(path.parent / (path.name + ".data")):
        model = build_llama(cfg, weights, kv_cache=True, attention_impl=attention_impl)
    proto = ir.serde.serialize_model(model)
    onnx.save_model(proto, str(path))
    return path
