"""Hugging Face decoders with LayerNorm and (mostly) parallel residuals → :class:`DecoderSpec` + canonical weights.

``gpt_neox`` (Pythia): fused ``query_key_value`` interleaved per head ``[H, (q|k|v), hd]``, two norms
on the same stream (``use_parallel_residual``: x + attn(ln1(x)) + mlp(ln2(x))), partial rotary.
``phi`` (Phi-1/2): one norm feeds attention and MLP (x + attn(ln(x)) + mlp(ln(x))), partial rotary,
``dense`` output projection, ``fc1``/``fc2`` MLP, a head with bias.  ``falcon``: fused
``query_key_value`` in its three layouts (multi-query ``[q…|k|v]``, per-head interleaved, and the
new architecture's per-KV-group ``[q…, k, v]``), shared or separate parallel norms.  ``stablelm``
and ``starcoder2``: Llama names with LayerNorm (StableLM's SwiGLU, StarCoder2's ``c_fc``/``c_proj``
GELU MLP with biases).  What the builder lacks (ALiBi, StableLM's per-head q/k norms, Phi's q/k
LayerNorms) is refused with a one-line error.  Every split is a row selection of the fused matrix,
so the graph computes exactly what transformers computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.frontends.decoder import DecoderSpec
from lowbit.frontends.hf_config import act_name, rope_config

__all__ = ["FAMILY_TYPES", "family_spec", "family_weights"]

FAMILY_TYPES = {"gpt_neox", "phi", "falcon", "stablelm", "starcoder2"}


def _windows(c) -> tuple:
    w = getattr(c, "sliding_window", None) or 0
    return (w,) * c.num_hidden_layers if w else ()


def family_spec(path: Path, c) -> DecoderSpec:
    mt = c.model_type
    d, n = c.hidden_size, c.num_attention_heads
    theta, scaling, partial = rope_config(path, getattr(c, "rope_parameters", None) or {})
    partial = getattr(c, "partial_rotary_factor", None) or partial
    hd = d // n
    rot = int(hd * partial)
    common = dict(vocab_size=c.vocab_size, hidden=d, n_layers=c.num_hidden_layers, n_heads=n, head_dim=hd,
                  norm="layer", rope_theta=theta, rope_scaling=scaling, rotary_dim=0 if rot == hd else rot,
                  tied=bool(getattr(c, "tie_word_embeddings", False)))
    if mt == "gpt_neox":
        return DecoderSpec(arch=mt, n_kv_heads=n, intermediate=c.intermediate_size, norm_eps=c.layer_norm_eps,
                           act=act_name(path, c.hidden_act), gated=False,
                           parallel="separate" if c.use_parallel_residual else "", **common)
    if mt == "phi":
        if getattr(c, "qk_layernorm", False):
            raise UnsupportedModelError(f"{path}: Phi with q/k LayerNorms (qk_layernorm=true) is not supported",
                                        hint="export it to ONNX and compile the .onnx file")
        return DecoderSpec(arch=mt, n_kv_heads=getattr(c, "num_key_value_heads", None) or n,
                           intermediate=c.intermediate_size, norm_eps=c.layer_norm_eps,
                           act=act_name(path, c.hidden_act), gated=False, parallel="shared", **common)
    if mt == "falcon":
        if c.alibi:
            raise UnsupportedModelError(f"{path}: Falcon with ALiBi position biases is not supported",
                                        hint="export it to ONNX and compile the .onnx file")
        new = c.new_decoder_architecture
        kv = c.num_kv_heads if new else (1 if c.multi_query else n)
        if new:
            parallel = "separate" if (c.num_ln_in_parallel_attn or 2) == 2 else "shared"
        else:
            parallel = "shared" if c.parallel_attn else ""
        return DecoderSpec(arch=mt, n_kv_heads=kv, intermediate=c.ffn_hidden_size or 4 * d,
                           norm_eps=c.layer_norm_epsilon, act=act_name(path, c.activation), gated=False,
                           parallel=parallel, **common)
    if mt == "stablelm":
        if c.qk_layernorm:
            raise UnsupportedModelError(f"{path}: StableLM with per-head q/k LayerNorms (qk_layernorm=true) is "
                                        "not supported", hint="export it to ONNX and compile the .onnx file")
        return DecoderSpec(arch=mt, n_kv_heads=c.num_key_value_heads or n, intermediate=c.intermediate_size,
                           norm_eps=c.layer_norm_eps, act=act_name(path, c.hidden_act),
                           parallel="shared" if c.use_parallel_residual else "", **common)
    if mt == "starcoder2":
        return DecoderSpec(arch=mt, n_kv_heads=c.num_key_value_heads or n, intermediate=c.intermediate_size,
                           norm_eps=c.norm_epsilon, act=act_name(path, c.hidden_act), gated=False,
                           layer_windows=_windows(c), **common)
    raise UnsupportedModelError(f"{path}: model type '{mt}' is not a supported decoder")


def _strip(raw: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}


def _copy(out: dict, raw: dict, src: str, dst: str) -> None:
    for part in ("weight", "bias"):
        if f"{src}.{part}" in raw:
            out[f"{dst}.{part}"] = raw[f"{src}.{part}"]


def _split_fused(out: dict, raw: dict, src: str, dst: str, spec: DecoderSpec) -> None:
    """Rows of a fused linear laid out per KV group ``[KV, H/KV + 2, hd]`` (each group's queries, its key,
    its value) → q_proj/k_proj/v_proj.  With KV = H this is GPT-NeoX's and Falcon-7B-style per-head
    ``[H, 3, hd]``; with KV = 1 it is multi-query ``[q… | k | v]``: one rule covers all three layouts."""
    H, KV, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    for part in ("weight", "bias"):
        m = raw.get(f"{src}.{part}")
        if m is None:
            continue
        rest = m.shape[1:]
        g = m.reshape(KV, H // KV + 2, hd, *rest)
        q, k, v = g[:, :-2], g[:, -2], g[:, -1]
        for role, t in zip("qkv", (q, k, v)):
            out[f"{dst}.{role}_proj.{part}"] = np.ascontiguousarray(t.reshape(-1, *rest))


def family_weights(spec: DecoderSpec, raw: dict[str, np.ndarray], mt: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if mt == "gpt_neox":
        raw = _strip(raw, "gpt_neox.")
        out["embed"], head = raw.get("embed_in.weight"), raw.get("embed_out.weight")
        _copy(out, raw, "final_layer_norm", "final_norm")
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "attention.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
                 "mlp.dense_4h_to_h": "mlp.down_proj"}
        fused = "attention.query_key_value"
    elif mt == "falcon":
        raw = _strip(raw, "transformer.")
        out["embed"], head = raw.get("word_embeddings.weight"), raw.get("lm_head.weight")
        _copy(out, raw, "ln_f", "final_norm")
        names = {"input_layernorm": "attn_norm", "ln_attn": "attn_norm", "ln_mlp": "ffn_norm",
                 "post_attention_layernorm": "ffn_norm", "self_attention.dense": "attn.o_proj",
                 "mlp.dense_h_to_4h": "mlp.up_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}
        fused = "self_attention.query_key_value"
    else:  # phi, stablelm, starcoder2: Llama names
        raw = _strip(raw, "model.")
        out["embed"], head = raw.get("embed_tokens.weight"), raw.get("lm_head.weight")
        _copy(out, raw, "final_layernorm" if mt == "phi" else "norm", "final_norm")
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                 "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
                 "self_attn.dense": "attn.o_proj", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
                 "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj", "mlp.gate_proj": "mlp.gate_proj",
                 "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}
        fused = None
    for i in range(spec.n_layers):
        src, dst = f"{'h' if mt == 'falcon' else 'layers'}.{i}", f"layers.{i}"
        for a, b in names.items():
            _copy(out, raw, f"{src}.{a}", f"{dst}.{b}")
        if fused:
            _split_fused(out, raw, f"{src}.{fused}", f"{dst}.attn", spec)
    if head is not None and not spec.tied:
        out["lm_head"] = head
    if "lm_head.bias" in raw:
        out["lm_head.bias"] = raw["lm_head.bias"]
    missing = [f"layers.{i}.{r}.weight" for i in range(spec.n_layers)
               for r in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
               if f"layers.{i}.{r}.weight" not in out]
    if out.get("embed") is None or missing:
        raise ModelLoadError(f"{mt}: weights {(missing or ['embeddings'])[:3]} are missing from the safetensors files",
                             hint="is this checkpoint complete and of the type config.json declares?")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items() if v is not None}
