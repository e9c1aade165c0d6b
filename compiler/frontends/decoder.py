"""One description of a decoder-only transformer → its two ONNX graphs (opset 23).

Every decoder frontend (llama2.c, Hugging Face folders, GGUF) reads its file into a
:class:`DecoderSpec` and a dict of numpy weights with the canonical names below, and calls
:func:`build_decoder`.  ``kv_cache`` picks the form:

**Cache-less form** (``kv_cache=False``; evaluation, calibration, TVM)::

    <spec.input_name>  int64 [batch, seq]          token ids ("tokens" for llama2.c, else "input_ids")
    logits             float32 [batch, seq, vocab]

Positions are ``0 .. seq-1``; attention is causal; there is no padding mask.

**KV-cache form** (``kv_cache=True``; one graph for prefill and decode, optimum /
onnxruntime-genai names)::

    input_ids                    int64   [batch, seq]            the new tokens
    attention_mask               int64   [batch, past+seq]       1 = real token, 0 = padding, over the
                                                                 cached keys followed by the new ones
    position_ids                 int64   [batch, seq]            position of each new token (RoPE angle or
                                                                 learned-position row); past+arange(seq) without
                                                                 padding, cumsum(attention_mask)-1 with left padding
    past_key_values.{i}.key      float32 [batch, kv_heads, past, head_dim]   keys after RoPE
    past_key_values.{i}.value    float32 [batch, kv_heads, past, head_dim]
    → logits                     float32 [batch, seq, vocab]
    → present.{i}.key / .value   float32 [batch, kv_heads, past+seq, head_dim]  = concat(past, new) on axis 2

Prefill passes ``past = 0`` (empty tensors); decode passes the previous ``present`` back.
New token ``s`` (key index ``past+s``) attends key ``j`` iff ``j <= past+s`` and
``attention_mask[b, j] == 1`` (and ``past+s-j < window`` on sliding-window layers).  Masked
scores get float32's lowest value (not -inf), so fully padded rows stay finite.

``attention_impl`` picks the attention core (default ``"plain"``: standard ops, the KV heads shared
by their query heads without copying the cache; ``"onnx"``: opset-23 ``Attention``; ``"gqa"``:
com.microsoft ``GroupQueryAttention``; ``"expand"``: the cache repeated per head).  All compute the
same function; :mod:`.decoder_attention` gives the measurement behind the default.

Canonical weight names (matrices [out, in], as torch's Linear stores them; biases optional):
``embed`` [vocab, d]; ``pos_embed`` [positions, d] (learned positions); ``lm_head`` (absent =
tied to ``embed``); ``final_norm.weight/.bias``; per layer ``layers.{i}.`` + ``attn_norm``,
``ffn_norm``, ``post_attn_norm``, ``post_ffn_norm`` (``.weight``/``.bias``), ``attn.q_proj``,
``attn.k_proj``, ``attn.v_proj``, ``attn.o_proj``, ``attn.q_norm``, ``attn.k_norm``,
``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj`` (``.weight``/``.bias``).  A non-gated MLP
has no ``gate_proj``.  Norm weights are the multipliers themselves: Gemma's ``1 + w`` is folded
by the frontend.

Graph names follow the weight names: linears are MatMul nodes ``layers.0.attn.q_proj`` against
``[in, out]`` initializers ``layers.0.attn.q_proj.weight`` (+ an Add ``….bias``); norms are
``RMSNormalization`` / ``LayerNormalization``.  The tied head is its own transposed copy so each can
be quantized alone (``lowbit.tied_embedding`` records the tie).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from lowbit.errors import UnsupportedModelError
from lowbit.ir.graph_builder import GraphBuilder
from lowbit.frontends.decoder_attention import IMPLS, apply_rope, attention, causal_bias, gqa_lengths, rope_angles

__all__ = ["DecoderSpec", "build_decoder", "KV_INPUTS", "kv_input_names", "kv_output_names", "ACTIVATIONS",
           "prefill_feeds"]

logger = logging.getLogger(__name__)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
KV_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class DecoderSpec:
    """Architecture of a pre-norm decoder; everything a frontend must decide."""

    arch: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    norm: str = "rms"                    # "rms" | "layer"
    norm_eps: float = 1e-5
    act: str = "silu"                    # one of ACTIVATIONS
    gated: bool = True                   # act(gate) * up  (SwiGLU / GeGLU)
    positions: str = "rope"              # "rope" | "learned"
    position_offset: int = 0             # OPT's learned positions start at row 2
    rope_theta: float = 10000.0
    rope_style: str = "half"             # "half" (HF rotate_half) | "interleaved" (llama2.c, GGUF)
    rotary_dim: int = 0                  # 0 = head_dim (partial rotary otherwise)
    rope_scaling: tuple = ()             # () | ("linear", factor) | ("llama3", factor, low, high, orig_max)
    rope_freq_factors: tuple = ()        # llama.cpp rope_freqs: inv_freq[i] /= factor[i] (global layers)
    layer_windows: tuple = ()            # per layer: 0 = global attention, W = sliding window of W keys
    local_rope_theta: float = 0.0        # Gemma-3: theta of sliding layers (0 = rope_theta)
    embed_scale: float = 0.0             # Gemma: embeddings × sqrt(hidden) (0 = none)
    attn_scale: float = 0.0              # 0 = 1/sqrt(head_dim)
    attn_softcap: float = 0.0            # Gemma-2: scores = cap·tanh(scores/cap)
    final_softcap: float = 0.0
    qk_norm: bool = False                # Qwen3 / Gemma-3: RMSNorm on each q/k head before RoPE
    sandwich_norm: bool = False          # Gemma-2/3: norms after attention and MLP too
    parallel: str = ""                   # "" sequential; x + attn(n1(x)) + mlp(n(x)) with n = n1 ("shared":
                                         # Phi-2, Falcon) or its own ffn_norm ("separate": GPT-NeoX, Falcon-40B)
    tied: bool = True
    input_name: str = "input_ids"        # cache-less form's token input
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise UnsupportedModelError(f"{self.arch}: norm '{self.norm}' is not supported (rms, layer)")
        if self.act not in ACTIVATIONS:
            raise UnsupportedModelError(f"{self.arch}: activation '{self.act}' is not supported",
                                        hint=f"supported: {', '.join(ACTIVATIONS)}")
        if self.positions not in ("rope", "learned"):
            raise UnsupportedModelError(f"{self.arch}: position encoding '{self.positions}' is not supported")
        if self.rope_style not in ("half", "interleaved"):
            raise UnsupportedModelError(f"{self.arch}: RoPE style '{self.rope_style}' is not supported")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(f"{self.arch}: {self.n_heads} query heads do not group over "
                                        f"{self.n_kv_heads} key/value heads")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise UnsupportedModelError(f"{self.arch}: rotary dim {self.rotary_dim} does not fit head dim "
                                        f"{self.head_dim}")
        if self.parallel not in ("", "shared", "separate"):
            raise UnsupportedModelError(f"{self.arch}: parallel residual '{self.parallel}' is not supported")
        if self.layer_windows and len(self.layer_windows) != self.n_layers:
            raise UnsupportedModelError(f"{self.arch}: {len(self.layer_windows)} layer types for "
                                        f"{self.n_layers} layers")

    @property
    def rot(self) -> int:
        return self.rotary_dim or self.head_dim

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    def rope_kind(self, layer: int) -> str:
        """"local" for sliding layers with their own RoPE theta (Gemma-3), else "global"."""
        return "local" if (self.window(layer) and self.local_rope_theta) else "global"

    def describe(self) -> str:
        skip = {"metadata"}
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name not in skip)


def kv_input_names(spec: DecoderSpec) -> list[str]:
    return list(KV_INPUTS) + [f"past_key_values.{i}.{kv}" for i in range(spec.n_layers) for kv in ("key", "value")]


def kv_output_names(spec: DecoderSpec) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(spec.n_layers) for kv in ("key", "value")]


def prefill_feeds(model: ir.Model, samples: list[dict]) -> list[dict]:
    """KV-graph feeds for prefill from ``{"ids": int64 [batch, seq]}`` samples: empty past, all-ones
    mask, positions ``0 .. seq-1`` (valid calibration samples for the KV form)."""
    pasts = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    feeds = []
    for sample in samples:
        ids = np.asarray(sample["ids"], dtype=np.int64)
        b, n = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((b, n), np.int64),
                "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()}
        for v in pasts:
            feed[v.name] = np.zeros((b, int(v.shape[1]), 0, int(v.shape[3])), np.float32)
        feeds.append(feed)
    return feeds


class _Emitter:
    """Holds the builder and weights while one graph is emitted."""

    def __init__(self, spec: DecoderSpec, w: dict[str, np.ndarray], g: GraphBuilder):
        self.spec, self.w, self.g = spec, w, g

    def f32(self, name: str) -> np.ndarray:
        return np.asarray(self.w[name], dtype=np.float32)

    def linear(self, x: str, name: str, out: str | None = None) -> str:
        g, w = self.g, self.f32(f"{name}.weight")
        y = g.op("MatMul", [x, g.init(f"{name}.weight", np.ascontiguousarray(w.T))], name=name,
                 out=None if f"{name}.bias" in self.w else out)
        if f"{name}.bias" in self.w:
            y = g.op("Add", [y, g.init(f"{name}.bias", self.f32(f"{name}.bias"))], name=f"{name}.bias_add", out=out)
        return y

    def norm(self, x: str, name: str) -> str:
        g, s = self.g, self.spec
        scale = g.init(f"{name}.weight", self.f32(f"{name}.weight"))
        if s.norm == "rms":
            return g.op("RMSNormalization", [x, scale], name=name, axis=-1, epsilon=s.norm_eps)
        bias = self.f32(f"{name}.bias") if f"{name}.bias" in self.w else np.zeros_like(self.f32(f"{name}.weight"))
        return g.op("LayerNormalization", [x, scale, g.init(f"{name}.bias", bias)], name=name, axis=-1,
                    epsilon=s.norm_eps)

    def act(self, x: str, name: str) -> str:
        g, a = self.g, self.spec.act
        if a == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], name=f"{name}.sigmoid")], name=f"{name}.silu")
        if a == "relu":
            return g.op("Relu", [x], name=f"{name}.relu")
        return g.op("Gelu", [x], name=f"{name}.gelu", approximate="tanh" if a == "gelu_tanh" else "none")

    def softcap(self, x: str, cap: float, name: str, out: str | None = None) -> str:
        g = self.g
        t = g.op("Tanh", [g.op("Div", [x, g.const(cap, np.float32)], name=f"{name}.div")], name=f"{name}.tanh")
        return g.op("Mul", [t, g.const(cap, np.float32)], name=name, out=out)

    def mlp(self, h: str, p: str) -> str:
        if self.spec.gated:
            gate = self.linear(h, f"{p}.mlp.gate_proj")
            up = self.linear(h, f"{p}.mlp.up_proj")
            h = self.g.op("Mul", [self.act(gate, f"{p}.mlp"), up], name=f"{p}.mlp.gated")
        else:
            h = self.act(self.linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp")
        return self.linear(h, f"{p}.mlp.down_proj")


def build_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray], *, kv_cache: bool = False,
                  attention_impl: str = "plain", metadata: dict[str, str] | None = None) -> ir.Model:
    """Emit the cache-less or the KV-cache graph of ``spec`` (see the module docstring)."""
    g = GraphBuilder(opset=23)
    e = _Emitter(spec, weights, g)
    s = spec
    if kv_cache:
        ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence_length"])
        mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"])
        pos = g.input("position_ids", TensorProto.INT64, ["batch", "sequence_length"])
        for i in range(s.n_layers):
            for kv in ("key", "value"):
                g.input(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                        ["batch", s.n_kv_heads, "past_sequence_length", s.head_dim])
        g.output("logits", TensorProto.FLOAT, ["batch", "sequence_length", s.vocab_size])
        for i in range(s.n_layers):
            for kv in ("key", "value"):
                g.output(f"present.{i}.{kv}", TensorProto.FLOAT,
                         ["batch", s.n_kv_heads, "total_sequence_length", s.head_dim])
    else:
        ids = g.input(s.input_name, TensorProto.INT64, ["batch", "seq"])
        mask = None
        g.output("logits", TensorProto.FLOAT, ["batch", "seq", s.vocab_size])
        seq = g.op("Squeeze", [g.op("Slice", [g.op("Shape", [ids]), g.const([1]), g.const([2])])],
                   name="seq_len")
        pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), seq, g.const(1)], name="positions"), g.const([0])],
                   name="position_ids")
    x = g.op("Gather", [g.init("embed.weight", e.f32("embed")), ids], name="embed")
    if s.embed_scale:
        x = g.op("Mul", [x, g.const(s.embed_scale, np.float32)], name="embed.scale")
    if s.positions == "learned":
        p = pos if not s.position_offset else g.op("Add", [pos, g.const(s.position_offset)], name="pos_offset")
        x = g.op("Add", [x, g.op("Gather", [g.init("pos_embed.weight", e.f32("pos_embed")), p],
                                  name="pos_embed")], name="embed.add_positions")
    if attention_impl not in IMPLS:
        raise UnsupportedModelError(f"attention_impl '{attention_impl}' is unknown", hint=f"one of {', '.join(IMPLS)}")
    if attention_impl == "gqa":
        biases = {0: gqa_lengths(g, ids, mask)}
    else:
        biases = {w: causal_bias(g, ids, mask, w, attention_impl)
                  for w in sorted({s.window(i) for i in range(s.n_layers)})}
    angles = {}
    if s.positions == "rope":  # sliding layers with their own theta (Gemma-3) are never scaled
        kinds = {s.rope_kind(i) for i in range(s.n_layers)}
        angles = {k: rope_angles(g, pos, s, k == "local") for k in sorted(kinds)}
    for i in range(s.n_layers):
        p = f"layers.{i}"
        h = e.norm(x, f"{p}.attn_norm")
        q = e.linear(h, f"{p}.attn.q_proj")
        k = e.linear(h, f"{p}.attn.k_proj")
        v = e.linear(h, f"{p}.attn.v_proj")
        q = g.op("Reshape", [q, g.const([0, 0, s.n_heads, s.head_dim])], name=f"{p}.attn.q_heads")
        k = g.op("Reshape", [k, g.const([0, 0, s.n_kv_heads, s.head_dim])], name=f"{p}.attn.k_heads")
        v = g.op("Reshape", [v, g.const([0, 0, s.n_kv_heads, s.head_dim])], name=f"{p}.attn.v_heads")
        if s.qk_norm:
            q = e.norm(q, f"{p}.attn.q_norm")
            k = e.norm(k, f"{p}.attn.k_norm")
        if s.positions == "rope":
            q = apply_rope(g, q, angles[s.rope_kind(i)], s, f"{p}.attn.q_rope")
            k = apply_rope(g, k, angles[s.rope_kind(i)], s, f"{p}.attn.k_rope")
        past = (f"past_key_values.{i}.key", f"past_key_values.{i}.value") if kv_cache else None
        present = (f"present.{i}.key", f"present.{i}.value") if kv_cache else None
        ctx = attention(e, q, k, v, biases[s.window(i)], past, present, p, attention_impl)
        o = e.linear(ctx, f"{p}.attn.o_proj")
        if s.parallel:  # attention and MLP read the same stream; both outputs are added to it at once
            m = e.mlp(h if s.parallel == "shared" else e.norm(x, f"{p}.ffn_norm"), p)
            x = g.op("Add", [g.op("Add", [m, o], name=f"{p}.parallel.sum"), x], name=f"{p}.residual")
            continue
        if s.sandwich_norm:
            o = e.norm(o, f"{p}.post_attn_norm")
        x = g.op("Add", [x, o], name=f"{p}.attn.residual")
        m = e.mlp(e.norm(x, f"{p}.ffn_norm"), p)
        if s.sandwich_norm:
            m = e.norm(m, f"{p}.post_ffn_norm")
        x = g.op("Add", [x, m], name=f"{p}.mlp.residual")
    h = e.norm(x, "final_norm")
    head = e.f32("lm_head" if "lm_head" in weights else "embed")
    logits = g.op("MatMul", [h, g.init("lm_head.weight", np.ascontiguousarray(head.T))], name="lm_head",
                  out=None if (s.final_softcap or "lm_head.bias" in weights) else "logits")
    if "lm_head.bias" in weights:
        logits = g.op("Add", [logits, g.init("lm_head.bias", e.f32("lm_head.bias"))], name="lm_head.bias_add",
                      out=None if s.final_softcap else "logits")
    if s.final_softcap:
        e.softcap(logits, s.final_softcap, "logits.softcap", out="logits")
    meta = {"lowbit.kind": "causal-lm", "lowbit.tied_embedding": str("lm_head" not in weights).lower(),
            "lowbit.arch": s.arch, "lowbit.config": s.describe(), "lowbit.kv_cache": str(kv_cache).lower()}
    meta.update(s.metadata)
    meta.update(metadata or {})
    return g.build(s.arch, meta)
