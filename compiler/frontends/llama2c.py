"""llama2.c checkpoints (``stories260K.bin`` and friends) → an ONNX Llama graph.

Header: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); a
negative vocab_size means the classifier is stored separately, otherwise it is tied to the token
embedding.  Weights follow as float32 in llama2.c's order, each matrix stored [out, in].

The graph (opset 23) takes int64 token ids ``[batch, seq]`` and returns float logits
``[batch, seq, vocab]``: RMSNormalization (eps 1e-5), RoPE on adjacent pairs (θ = 10000),
grouped-query attention with a causal mask, a SwiGLU MLP and the head.  Linear layers are
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
from onnx import TensorProto

from lowbit.errors import ModelLoadError
from lowbit.ir.graph_builder import GraphBuilder

__all__ = ["LlamaConfig", "read_llama2c", "build_llama", "load_llama2c", "random_llama_weights"]


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


def _rope_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    angles = np.outer(np.arange(cfg.seq_len, dtype=np.float64), freqs)  # [seq, hd/2]
    return (np.cos(angles).astype(np.float32)[:, None, :], np.sin(angles).astype(np.float32)[:, None, :])


def build_llama(cfg: LlamaConfig, w: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> ir.Model:
    g = GraphBuilder(opset=23)
    tokens = g.input("tokens", TensorProto.INT64, ["batch", "seq"])
    g.output("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])
    hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    group = H // KV
    x = g.op("Gather", [g.init("embed.weight", w["embed"]), tokens], name="embed")
    seq = g.op("Slice", [g.op("Shape", [tokens]), g.const([1]), g.const([2])], name="seq_len")
    cos_t, sin_t = _rope_tables(cfg)
    cos = g.op("Slice", [g.init("rope.cos", cos_t), g.const([0]), seq, g.const([0])], name="rope_cos")
    sin = g.op("Slice", [g.init("rope.sin", sin_t), g.const([0]), seq, g.const([0])], name="rope_sin")
    square = g.op("Concat", [seq, seq], name="mask_shape", axis=0)
    neg_inf = g.op("ConstantOfShape", [square], name="mask_fill",
                   value=__import__("onnx").numpy_helper.from_array(np.array([-np.inf], np.float32)))
    mask = g.op("Trilu", [neg_inf, g.const(1)], name="causal_mask", upper=1)
    scale = g.const(1.0 / np.sqrt(hd), np.float32)

    def linear(inp, weight, name):
        return g.op("MatMul", [inp, g.init(f"{name}.weight", np.ascontiguousarray(weight.T))], name=name)

    def rope(t, heads, name):
        pairs = g.op("Reshape", [t, g.const([0, 0, heads, hd // 2, 2])], name=f"{name}.pairs")
        a, b = g.op("Split", [pairs], name=f"{name}.split", outputs=2, axis=-1, num_outputs=2)
        a = g.op("Squeeze", [a, g.const([-1])], name=f"{name}.even")
        b = g.op("Squeeze", [b, g.const([-1])], name=f"{name}.odd")
        ra = g.op("Sub", [g.op("Mul", [a, cos]), g.op("Mul", [b, sin])], name=f"{name}.rot_even")
        rb = g.op("Add", [g.op("Mul", [a, sin]), g.op("Mul", [b, cos])], name=f"{name}.rot_odd")
        both = g.op("Concat", [g.op("Unsqueeze", [ra, g.const([-1])]), g.op("Unsqueeze", [rb, g.const([-1])])],
                    name=f"{name}.join", axis=-1)
        heads_t = g.op("Reshape", [both, g.const([0, 0, heads, hd])], name=f"{name}.heads")
        return g.op("Transpose", [heads_t], name=f"{name}.bhsd", perm=[0, 2, 1, 3])

    def repeat_kv(t, name):
        if group == 1:
            return t
        t = g.op("Unsqueeze", [t, g.const([2])], name=f"{name}.unsq")
        t = g.op("Expand", [t, g.const([1, 1, group, 1, 1])], name=f"{name}.expand")
        return g.op("Reshape", [t, g.const([0, H, -1, hd])], name=f"{name}.repeat")

    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        h = g.op("RMSNormalization", [x, g.init(f"{p}.attn_norm.weight", w["attn_norm"][i])],
                 name=f"{p}.attn_norm", axis=-1, epsilon=cfg.norm_eps)
        q = rope(linear(h, w["q"][i], f"{p}.attn.q_proj"), H, f"{p}.attn.q_rope")
        k = rope(linear(h, w["k"][i], f"{p}.attn.k_proj"), KV, f"{p}.attn.k_rope")
        v = linear(h, w["v"][i], f"{p}.attn.v_proj")
        v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, KV, hd])], name=f"{p}.attn.v_heads")],
                 name=f"{p}.attn.v_bhsd", perm=[0, 2, 1, 3])
        k, v = repeat_kv(k, f"{p}.attn.k"), repeat_kv(v, f"{p}.attn.v")
        kt = g.op("Transpose", [k], name=f"{p}.attn.kT", perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, kt], name=f"{p}.attn.qk"), scale], name=f"{p}.attn.scale")
        probs = g.op("Softmax", [g.op("Add", [scores, mask], name=f"{p}.attn.mask")], name=f"{p}.attn.softmax",
                     axis=-1)
        ctx = g.op("MatMul", [probs, v], name=f"{p}.attn.pv")
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], name=f"{p}.attn.bshd", perm=[0, 2, 1, 3]),
                               g.const([0, 0, cfg.dim])], name=f"{p}.attn.merge")
        x = g.op("Add", [x, linear(ctx, w["o"][i], f"{p}.attn.o_proj")], name=f"{p}.attn.residual")
        h = g.op("RMSNormalization", [x, g.init(f"{p}.ffn_norm.weight", w["ffn_norm"][i])],
                 name=f"{p}.ffn_norm", axis=-1, epsilon=cfg.norm_eps)
        gate = linear(h, w["w1"][i], f"{p}.mlp.gate_proj")
        up = linear(h, w["w3"][i], f"{p}.mlp.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.mlp.sigmoid")], name=f"{p}.mlp.silu")
        prod = g.op("Mul", [act, up], name=f"{p}.mlp.gated")
        x = g.op("Add", [x, linear(prod, w["w2"][i], f"{p}.mlp.down_proj")], name=f"{p}.mlp.residual")
    h = g.op("RMSNormalization", [x, g.init("final_norm.weight", w["final_norm"])], name="final_norm",
             axis=-1, epsilon=cfg.norm_eps)
    g.op("MatMul", [h, g.init("lm_head.weight", np.ascontiguousarray(w["head"].T))], name="lm_head", out="logits")
    meta = {"lowbit.kind": "causal-lm", "lowbit.tied_embedding": str(cfg.tied).lower(),
            "lowbit.config": ",".join(f"{k}={getattr(cfg, k)}" for k in cfg.__dataclass_fields__)}
    meta.update(metadata or {})
    return g.build("llama", meta)


def load_llama2c(path: str | Path, tokenizer: str | Path | None = None) -> ir.Model:
    cfg, weights = read_llama2c(path)
    meta = {"lowbit.source": Path(path).name}
    if tokenizer is not None:
        meta["lowbit.tokenizer"] = str(Path(tokenizer).resolve())
    return build_llama(cfg, weights, meta)
