"""llama2.c checkpoints (``stories260K.bin`` and friends) → an ONNX Llama graph.

Header: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); a
negative vocab_size means the classifier is stored separately, otherwise it is tied to the token
embedding.  Weights follow as float32 in llama2.c's order, each matrix stored [out, in].

The graph (opset 23, built by :mod:`.decoder`) takes int64 token ids ``tokens [batch, seq]``
and returns float logits ``[batch, seq, vocab]``: RMSNormalization (eps 1e-5), RoPE on adjacent
pairs (θ = 10000), grouped-query attention with a causal mask, a SwiGLU MLP and the head.
``kv_cache=True`` gives the KV-cache form instead (inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/value``; see :mod:`.decoder`).  Linear layers are
MatMuls against pre-transposed ``[in, out]`` initializers named after their role, e.g.
``layers.0.attn.q_proj.weight``.  A tied head is a copy of the embedding (transposed), so each
can later be quantized on its own; ``lowbit.tied_embedding`` in the metadata records the tie.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.errors import ModelLoadError
from lowbit.frontends.decoder import DecoderSpec, build_decoder

__all__ = ["LlamaConfig", "read_llama2c", "build_llama", "load_llama2c", "random_llama_weights", "llama2c_spec",
           "decoder_weights"]


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    tied: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


_NAMES = ("q", "k", "v", "o", "w1", "w2", "w3")


def read_llama2c(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a llama2.c checkpoint into (config, weights); matrices stay [out, in]."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    if raw.size < 28:
        raise ModelLoadError(f"{path}: {raw.size} bytes is too short for a llama2.c checkpoint header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28].tobytes())
    tied = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ModelLoadError(f"{path}: header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len} is not a "
                             "valid llama2.c config", hint="is this a llama2.c .bin checkpoint?")
    cfg = LlamaConfig(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, tied)
    hd, kv, L = cfg.head_dim, cfg.kv_dim, n_layers
    shapes = [
        ("embed", (vocab, dim)), ("attn_norm", (L, dim)), ("q", (L, dim, dim)), ("k", (L, kv, dim)),
        ("v", (L, kv, dim)), ("o", (L, dim, dim)), ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("final_norm", (dim,)),
        ("freq_cis", (seq_len, hd)),
    ]
    if not tied:
        shapes.append(("head", (vocab, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes)
    floats = raw[28:].view(np.float32) if (raw.size - 28) % 4 == 0 else None
    if floats is None or floats.size != need:
        have = (raw.size - 28) / 4
        raise ModelLoadError(f"{path}: holds {have:g} floats after the header, config {cfg} needs {need}",
                             hint="the file is truncated or not a llama2.c checkpoint")
    weights, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        weights[name] = floats[off : off + n].reshape(shape)
        off += n
    weights.pop("freq_cis")
    if tied:
        weights["head"] = weights["embed"]
    return cfg, weights


def random_llama_weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the right shapes and scales, for speed and scale work only."""
    rng = np.random.default_rng(seed)
    L, d, h, kv, v = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    out = {"embed": w(v, d), "attn_norm": np.ones((L, d), np.float32), "q": w(L, d, d), "k": w(L, kv, d),
           "v": w(L, kv, d), "o": w(L, d, d), "ffn_norm": np.ones((L, d), np.float32), "w1": w(L, h, d),
           "w2": w(L, d, h), "w3": w(L, h, d), "final_norm": np.ones(d, np.float32)}
    out["head"] = out["embed"] if cfg.tied else w(v, d)
    return out


def llama2c_spec(cfg: LlamaConfig) -> DecoderSpec:
    return DecoderSpec(arch="llama", vocab_size=cfg.vocab_size, hidden=cfg.dim, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       intermediate=cfg.hidden_dim, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                       rope_style="interleaved", tied=cfg.tied, input_name="tokens")


def decoder_weights(cfg: LlamaConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama2.c's stacked arrays → :mod:`.decoder`'s canonical names."""
    out = {"embed": w["embed"], "final_norm.weight": w["final_norm"]}
    if not cfg.tied:
        out["lm_head"] = w["head"]
    roles = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i in range(cfg.n_layers):
        out[f"layers.{i}.attn_norm.weight"] = w["attn_norm"][i]
        out[f"layers.{i}.ffn_norm.weight"] = w["ffn_norm"][i]
        for src, dst in roles.items():
            out[f"layers.{i}.{dst}.weight"] = w[src][i]
    return out


def build_llama(cfg: LlamaConfig, w: dict[str, np.ndarray], metadata: dict[str, str] | None = None, *,
                kv_cache: bool = False, attention_impl: str = "plain") -> ir.Model:
    """The cache-less ``tokens → logits`` graph, or the KV-cache graph (see :mod:`.decoder`)."""
    meta = {"lowbit.llama2c_config": ",".join(f"{k}={getattr(cfg, k)}" for k in cfg.__dataclass_fields__)}
    meta.update(metadata or {})
    return build_decoder(llama2c_spec(cfg), decoder_weights(cfg, w), kv_cache=kv_cache,
                         attention_impl=attention_impl, metadata=meta)


def load_llama2c(path: str | Path, tokenizer: str | Path | None = None, *, kv_cache: bool = False) -> ir.Model:
    cfg, weights = read_llama2c(path)
    meta = {"lowbit.source": Path(path).name}
    if tokenizer is not None:
        meta["lowbit.tokenizer"] = str(Path(tokenizer).resolve())
    return build_llama(cfg, weights, meta, kv_cache=kv_cache)
