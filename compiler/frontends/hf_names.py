"""Hugging Face parameter names → the decoder builder's canonical names (see :mod:`.decoder`).

Fused matrices are split here: Phi-3 ``qkv_proj`` into q/k/v rows and ``gate_up_proj`` into gate
then up; GPT-2's ``c_attn`` (a Conv1D, ``[in, out]``) into q/k/v columns.  Gemma's norms multiply
by ``1 + w``, which is folded into the weight.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import ModelLoadError

__all__ = ["canonical_weights"]

_LLAMA = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
          "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj", "self_attn.q_norm": "attn.q_norm",
          "self_attn.k_norm": "attn.k_norm", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
          "mlp.down_proj": "mlp.down_proj", "post_attention_layernorm": "ffn_norm"}
_GEMMA2 = dict(_LLAMA, post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="ffn_norm",
               post_feedforward_layernorm="post_ffn_norm")
_OPT = {"self_attn_layer_norm": "attn_norm", "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj", "self_attn.out_proj": "attn.o_proj", "final_layer_norm": "ffn_norm",
        "fc1": "mlp.up_proj", "fc2": "mlp.down_proj"}
_GPT2 = {"ln_1": "attn_norm", "attn.c_proj": "attn.o_proj", "ln_2": "ffn_norm", "mlp.c_fc": "mlp.up_proj",
         "mlp.c_proj": "mlp.down_proj"}


def _strip(raw: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in raw.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _layers(raw, spec, table, layer_prefix):
    out = {}
    for i in range(spec.n_layers):
        for src, dst in table.items():
            for part in ("weight", "bias"):
                key = f"{layer_prefix}{i}.{src}.{part}"
                if key in raw:
                    out[f"layers.{i}.{dst}.{part}"] = raw[key]
    return out


def _need(raw, key, where):
    if key not in raw:
        raise ModelLoadError(f"{where}: weight '{key}' is missing", hint="is the safetensors file complete?")
    return raw[key]


def canonical_weights(spec, raw: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    H, KV, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    if model_type == "gpt2":
        raw = _strip(raw, ("transformer.",))
        out = {"embed": _need(raw, "wte.weight", "gpt2"), "pos_embed": _need(raw, "wpe.weight", "gpt2"),
               "final_norm.weight": raw["ln_f.weight"], "final_norm.bias": raw["ln_f.bias"]}
        out.update(_layers(raw, spec, _GPT2, "h."))
        for k in [k for k in out if k.endswith(".weight") and (".attn.o_proj" in k or ".mlp." in k)]:
            out[k] = out[k].T  # Conv1D stores [in, out]
        for i in range(spec.n_layers):
            w, b = raw[f"h.{i}.attn.c_attn.weight"], raw[f"h.{i}.attn.c_attn.bias"]
            for j, role in enumerate("qkv"):
                cols = slice(j * spec.hidden, (j + 1) * spec.hidden)
                out[f"layers.{i}.attn.{role}_proj.weight"] = w[:, cols].T
                out[f"layers.{i}.attn.{role}_proj.bias"] = b[cols]
    elif model_type == "opt":
        raw = _strip(raw, ("model.decoder.", "decoder."))
        out = {"embed": _need(raw, "embed_tokens.weight", "opt"), "pos_embed": _need(raw, "embed_positions.weight", "opt"),
               "final_norm.weight": _need(raw, "final_layer_norm.weight", "opt"),
               "final_norm.bias": raw["final_layer_norm.bias"]}
        out.update(_layers(raw, spec, _OPT, "layers."))
    else:
        raw = _strip(raw, ("model.",))
        table = _GEMMA2 if spec.sandwich_norm else _LLAMA
        out = {"embed": _need(raw, "embed_tokens.weight", model_type),
               "final_norm.weight": _need(raw, "norm.weight", model_type)}
        out.update(_layers(raw, spec, table, "layers."))
        for i in range(spec.n_layers):
            fused = raw.get(f"layers.{i}.self_attn.qkv_proj.weight")
            if fused is not None:  # Phi-3
                q, k, v = np.split(fused, [H * hd, H * hd + KV * hd], axis=0)
                for role, m in zip("qkv", (q, k, v)):
                    out[f"layers.{i}.attn.{role}_proj.weight"] = m
            gate_up = raw.get(f"layers.{i}.mlp.gate_up_proj.weight")
            if gate_up is not None:
                gate, up = np.split(gate_up, 2, axis=0)
                out[f"layers.{i}.mlp.gate_proj.weight"], out[f"layers.{i}.mlp.up_proj.weight"] = gate, up
        if model_type.startswith("gemma"):
            for k in [k for k in out if k.endswith("norm.weight")]:
                out[k] = out[k] + np.float32(1.0)
    head = raw.get("lm_head.weight")
    if head is not None and not spec.tied:
        out["lm_head"] = head
    if "lm_head.bias" in raw:
        out["lm_head.bias"] = raw["lm_head.bias"]
    missing = [f"layers.{i}.{r}.weight" for i in range(spec.n_layers)
               for r in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
               if f"layers.{i}.{r}.weight" not in out]
    if missing:
        raise ModelLoadError(f"{model_type}: weights {missing[:3]} are missing from the safetensors files",
                             hint="is this checkpoint complete and of the type config.json declares?")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
