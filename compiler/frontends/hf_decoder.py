"""Hugging Face decoder folders (config.json + safetensors) → :mod:`.decoder`'s graphs.

Supported ``model_type``: llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text, gpt2, opt, and
(through :mod:`.hf_families`) gpt_neox, phi, falcon, stablelm, starcoder2.  Any other causal LM is exported
by torch (:mod:`.hf_exported`, cache-less form only).  Mixture-of-experts configs are refused, naming the
expert count.
The weights are read with ``safetensors`` (never a pickle), converted to float32 and renamed to the
builder's canonical names; fused matrices are split at load (Phi-3 ``qkv_proj`` and ``gate_up_proj``,
GPT-2 ``c_attn``), GPT-2's Conv1D ``[in, out]`` matrices are transposed, Gemma's RMSNorm multiplier
``1 + w`` is folded into the weight.  What the builder does not implement (RoPE scaling other than
linear / llama3, post-norm OPT, OPT's projected embeddings, GPT-2's per-layer attention scaling, …)
is refused with a one-line error.  The folder's tokenizer is recorded for calibration and eval.
The graph is float32 whatever the checkpoint's dtype (bf16/fp16 weights are widened exactly).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.frontends.decoder import DecoderSpec, build_decoder
from lowbit.frontends.hf_config import act_name as _act, rope_config as _rope
from lowbit.frontends.hf_families import FAMILY_TYPES, family_spec, family_weights
from lowbit.frontends.hf_names import canonical_weights

__all__ = ["DECODER_TYPES", "is_decoder_folder", "load_hf_decoder", "hf_decoder_spec", "read_safetensors"]

logger = logging.getLogger(__name__)

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"}
DECODER_TYPES = _LLAMA_LIKE | {"gpt2", "opt"} | FAMILY_TYPES
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's ``*.safetensors`` files as float32 numpy (bf16 through torch)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no .safetensors weights; lowbit does not load pickled checkpoints",
                             hint="convert the weights to safetensors (they cannot run code when loaded)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).float().numpy()
    return out


def hf_decoder_spec(path: Path, c) -> DecoderSpec:
    """Map a transformers config to a :class:`DecoderSpec` (refusing what the builder lacks)."""
    mt = c.model_type
    if mt in FAMILY_TYPES:
        return family_spec(path, c)
    if mt == "gpt2":
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
            raise UnsupportedModelError(f"{path}: GPT-2 with per-layer attention scaling is not supported")
        if not getattr(c, "scale_attn_weights", True):
            raise UnsupportedModelError(f"{path}: GPT-2 without attention scaling is not supported")
        d, n = c.n_embd, c.n_head
        return DecoderSpec(arch="gpt2", vocab_size=c.vocab_size, hidden=d, n_layers=c.n_layer, n_heads=n,
                           n_kv_heads=n, head_dim=d // n, intermediate=c.n_inner or 4 * d, norm="layer",
                           norm_eps=c.layer_norm_epsilon, act=_act(path, c.activation_function), gated=False,
                           positions="learned")
    if mt == "opt":
        if not c.do_layer_norm_before:
            raise UnsupportedModelError(f"{path}: post-norm OPT (do_layer_norm_before=false) is not supported")
        if c.word_embed_proj_dim != c.hidden_size:
            raise UnsupportedModelError(f"{path}: OPT with projected embeddings (word_embed_proj_dim "
                                        f"{c.word_embed_proj_dim} != hidden {c.hidden_size}) is not supported")
        d, n = c.hidden_size, c.num_attention_heads
        return DecoderSpec(arch="opt", vocab_size=c.vocab_size, hidden=d, n_layers=c.num_hidden_layers, n_heads=n,
                           n_kv_heads=n, head_dim=d // n, intermediate=c.ffn_dim, norm="layer", norm_eps=1e-5,
                           act=_act(path, c.activation_function), gated=False, positions="learned",
                           position_offset=2, tied=bool(getattr(c, "tie_word_embeddings", True)))
    if mt not in _LLAMA_LIKE:
        raise UnsupportedModelError(f"{path}: model type '{mt}' is not a supported decoder",
                                    hint=f"supported: {', '.join(sorted(DECODER_TYPES))}; or export it to ONNX")
    gemma = mt.startswith("gemma")
    d, n = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or n
    hd = getattr(c, "head_dim", None) or d // n
    rp = getattr(c, "rope_parameters", None) or {}
    local_theta = 0.0
    if "full_attention" in rp:  # per layer type (Gemma-3)
        theta, scaling, partial = _rope(path, rp["full_attention"])
        if "sliding_attention" in rp:
            local_theta, local_scaling, _ = _rope(path, rp["sliding_attention"])
            if local_scaling:
                raise UnsupportedModelError(f"{path}: RoPE scaling on sliding-window layers is not implemented")
    else:
        theta, scaling, partial = _rope(path, rp or getattr(c, "rope_scaling", None),
                                        getattr(c, "rope_theta", None) or 10000.0)
    partial = getattr(c, "partial_rotary_factor", None) or partial
    rot = int(hd * partial)
    types = list(getattr(c, "layer_types", None) or [])
    window = getattr(c, "sliding_window", None) or 0
    if mt == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = 0
    if types:
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    else:
        windows = (window,) * c.num_hidden_layers
    act = _act(path, getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None))
    if gemma and act == "gelu":  # Gemma's MLP is GeGLU with the tanh approximation
        act = "gelu_tanh"
    qpas = getattr(c, "query_pre_attn_scalar", None)
    return DecoderSpec(
        arch=mt, vocab_size=c.vocab_size, hidden=d, n_layers=c.num_hidden_layers, n_heads=n, n_kv_heads=kv,
        head_dim=hd, intermediate=c.intermediate_size, norm_eps=c.rms_norm_eps, act=act, rope_theta=theta,
        rotary_dim=0 if rot == hd else rot, rope_scaling=scaling, layer_windows=windows if any(windows) else (),
        local_rope_theta=local_theta if local_theta != theta else 0.0,
        embed_scale=math.sqrt(d) if gemma else 0.0, attn_scale=qpas ** -0.5 if (gemma and qpas) else 0.0,
        attn_softcap=float(getattr(c, "attn_logit_softcapping", None) or 0.0),
        final_softcap=float(getattr(c, "final_logit_softcapping", None) or 0.0),
        qk_norm=mt in ("qwen3", "gemma3_text"), sandwich_norm=mt in ("gemma2", "gemma3_text"),
        tied=bool(getattr(c, "tie_word_embeddings", False)))


def is_decoder_folder(path: Path) -> bool:
    """config.json names a decoder type this frontend builds, or a causal-LM class (refused with a reason)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in DECODER_TYPES or any(str(a).endswith(("ForCausalLM", "LMHeadModel"))
                                                         for a in archs)


def load_hf_decoder(path: str | Path, *, kv_cache: bool = False) -> ir.Model:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    try:
        cfg_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    experts = max((int(cfg_json.get(k) or 0) for k in _EXPERTS), default=0)
    if experts > 1:
        raise UnsupportedModelError(f"{path}: model type '{cfg_json.get('model_type')}' is a mixture-of-experts "
                                    f"decoder ({experts} experts); lowbit does not build expert routing",
                                    hint="quantize a dense model, or export this one to ONNX yourself")
    if cfg_json.get("model_type") not in DECODER_TYPES:  # transformers' own graph, through torch's exporter
        from lowbit.frontends.hf_exported import load_exported_decoder
        from lowbit.passmanager.manager import CompileContext, PassManager

        model = load_exported_decoder(path, str(cfg_json.get("model_type")), kv_cache=kv_cache)
        return PassManager.from_pipeline("canonicalize", CompileContext(show_progress=False)).run(model)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    spec = hf_decoder_spec(path, config)
    raw = read_safetensors(path)
    if config.model_type in FAMILY_TYPES:
        weights = family_weights(spec, raw, config.model_type)
    else:
        weights = canonical_weights(spec, raw, config.model_type)
    meta = {"lowbit.source": path.name, "lowbit.tokenizer": str(path.resolve())}
    logger.info("%s: %s decoder, %d layers", path, spec.arch, spec.n_layers)
    return build_decoder(spec, weights, kv_cache=kv_cache, metadata=meta)
