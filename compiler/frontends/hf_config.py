"""transformers config fields shared by the Hugging Face decoder frontends: activation names and RoPE
parameters, mapped to :class:`lowbit.frontends.decoder.DecoderSpec`'s vocabulary (refusing the rest)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import UnsupportedModelError

__all__ = ["ACTS", "act_name", "rope_config"]

ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu": "relu"}


def act_name(path: Path, name: str | None) -> str:
    if name not in ACTS:
        raise UnsupportedModelError(f"{path}: activation '{name}' is not supported",
                                    hint=f"supported: {', '.join(sorted(ACTS))}")
    return ACTS[name]


def rope_config(path: Path, params: dict | None, default_theta: float = 10000.0) -> tuple[float, tuple, float]:
    """(theta, scaling tuple, partial rotary factor) from a transformers ``rope_parameters`` dict."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", default_theta))
    if kind == "default":
        scaling = ()
    elif kind == "linear":
        scaling = ("linear", float(params["factor"]))
    elif kind == "llama3":
        scaling = ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                   float(params["high_freq_factor"]), float(params["original_max_position_embeddings"]))
    else:
        raise UnsupportedModelError(f"{path}: RoPE scaling '{kind}' is not implemented",
                                    hint="supported: default, linear, llama3")
    return theta, scaling, float(params.get("partial_rotary_factor", 1.0) or 1.0)
