"""GGUF files (llama.cpp's format, read with the ``gguf`` package) → :mod:`.decoder`'s graphs.

Architecture ``llama`` (which llama.cpp also uses for Mistral, SmolLM, TinyLlama, …): every tensor is
dequantized to float32 with ``gguf.quants.dequantize`` (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the
K-quants, the IQ types — whatever the installed package can dequantize; anything else is refused
naming the tensor).  llama.cpp's converter permutes q/k rows so that RoPE rotates adjacent pairs,
so the graph uses ``rope_style="interleaved"`` on the weights as stored.  ``rope_freqs`` (Llama-3.1
frequency factors) and linear RoPE scaling are applied; other scaling types, mixture-of-experts
and other architectures are refused.  The tokenizer is read from the same file when needed
(:mod:`.text_tokenizers`); the model records the file as ``lowbit.tokenizer``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.frontends.decoder import DecoderSpec, build_decoder

__all__ = ["load_gguf", "read_gguf", "gguf_fields"]

logger = logging.getLogger(__name__)

_ROLES = {"attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight", "attn_q": "attn.q_proj.weight",
          "attn_k": "attn.k_proj.weight", "attn_v": "attn.v_proj.weight", "attn_output": "attn.o_proj.weight",
          "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight",
          "attn_q.bias": "attn.q_proj.bias", "attn_k.bias": "attn.k_proj.bias", "attn_v.bias": "attn.v_proj.bias"}


def _reader(path: Path):
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError("reading GGUF files needs the gguf package", hint="pip install gguf") from exc
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})", hint="is the file complete?") from exc


def gguf_fields(reader) -> dict:
    """Every metadata key → its Python value (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return out


def _dequantize(path: Path, tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as exc:
        name = GGMLQuantizationType(tensor.tensor_type).name
        raise UnsupportedModelError(f"{path}: tensor '{tensor.name}' has type {name}, which the installed gguf "
                                    f"package cannot dequantize ({exc})", hint="pip install -U gguf") from exc
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _role(parts: list[str]) -> str:
    """``blk.3.attn_q.weight`` → ``attn_q``; ``blk.3.attn_q.bias`` → ``attn_q.bias``."""
    rest = parts[2:]
    return ".".join(rest[:-1] if rest and rest[-1] == "weight" else rest)


def read_gguf(path: str | Path) -> tuple[DecoderSpec, dict[str, np.ndarray], dict]:
    """(spec, canonical float32 weights, metadata fields) of a llama-architecture GGUF file."""
    path = Path(path)
    reader = _reader(path)
    f = gguf_fields(reader)
    arch = f.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: GGUF architecture '{arch}' is not supported",
                                    hint="supported: llama (Llama, Mistral, SmolLM, TinyLlama, …)")
    a = f"{arch}."
    if f.get(a + "expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts GGUF models are not supported")
    scaling_type = f.get(a + "rope.scaling.type", "none")
    scaling: tuple = ()
    if scaling_type == "linear":
        scaling = ("linear", float(f[a + "rope.scaling.factor"]))
    elif scaling_type != "none":
        raise UnsupportedModelError(f"{path}: RoPE scaling '{scaling_type}' is not implemented",
                                    hint="supported: none, linear (and rope_freqs factors)")
    raw = {t.name: t for t in reader.tensors}
    weights: dict[str, np.ndarray] = {}
    for name, t in raw.items():
        parts = name.split(".")
        if name == "token_embd.weight":
            weights["embed"] = _dequantize(path, t)
        elif name == "output_norm.weight":
            weights["final_norm.weight"] = _dequantize(path, t)
        elif name == "output.weight":
            weights["lm_head"] = _dequantize(path, t)
        elif name == "rope_freqs.weight":
            weights["rope_freqs"] = _dequantize(path, t)
        elif parts[0] == "blk" and _role(parts) in _ROLES:
            weights[f"layers.{parts[1]}.{_ROLES[_role(parts)]}"] = _dequantize(path, t)
        else:
            logger.warning("%s: tensor '%s' is not used", path, name)
    if "embed" not in weights:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor", hint="is this a llama GGUF model file?")
    n_layers = int(f[a + "block_count"])
    d, n = int(f[a + "embedding_length"]), int(f[a + "attention.head_count"])
    hd = int(f.get(a + "attention.key_length", d // n))
    rot = int(f.get(a + "rope.dimension_count", hd))
    freqs = weights.pop("rope_freqs", None)
    spec = DecoderSpec(
        arch="llama", vocab_size=int(weights["embed"].shape[0]), hidden=d, n_layers=n_layers, n_heads=n,
        n_kv_heads=int(f.get(a + "attention.head_count_kv", n)), head_dim=hd,
        intermediate=int(f[a + "feed_forward_length"]),
        norm_eps=float(f.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f.get(a + "rope.freq_base", 10000.0)), rope_style="interleaved",
        rotary_dim=0 if rot == hd else rot, rope_scaling=scaling,
        rope_freq_factors=tuple(float(x) for x in freqs.ravel()) if freqs is not None else (),
        tied="lm_head" not in weights)
    return spec, weights, f


def load_gguf(path: str | Path, *, kv_cache: bool = False) -> ir.Model:
    path = Path(path)
    spec, weights, f = read_gguf(path)
    meta = {"lowbit.source": path.name, "lowbit.tokenizer": str(path.resolve())}
    if "general.name" in f:
        meta["lowbit.gguf_name"] = str(f["general.name"])
    logger.info("%s: llama GGUF, %d layers, hidden %d", path, spec.n_layers, spec.hidden)
    return build_decoder(spec, weights, kv_cache=kv_cache, metadata=meta)
