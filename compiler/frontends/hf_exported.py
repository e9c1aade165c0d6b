"""Hugging Face causal LMs that lowbit's decoder builder does not describe → torch's dynamo exporter.

A folder whose ``model_type`` the builder lacks (OLMo-2, Granite, Cohere, …) is loaded with
``AutoModelForCausalLM`` from its safetensors (never a pickle, never remote code) and exported as
``input_ids [batch, seq] → logits [batch, seq, vocab]`` (no cache; opset 21), then canonicalized like any
ONNX file.  The graph is whatever transformers computes, so every architecture the exporter handles
works; what it cannot export is refused with its first error line.  The KV-cache form is built only
for the builder's architectures (``kv_cache=True`` is refused here, naming the model type).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.frontends.torch_module import export_module

__all__ = ["load_exported_decoder"]

logger = logging.getLogger(__name__)


def load_exported_decoder(path: Path, model_type: str, *, kv_cache: bool = False) -> ir.Model:
    if kv_cache:
        raise UnsupportedModelError(f"{path}: the KV-cache form is not built for model type '{model_type}' (lowbit's "
                                    "decoder builder does not describe it; the cache-less graph is exported by torch)",
                                    hint="compile without --kv-cache, or export past/present yourself (optimum)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no .safetensors weights; lowbit does not load pickled checkpoints",
                             hint="convert the weights to safetensors (they cannot run code when loaded)")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False, dtype=torch.float32).eval()
    except (ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UnsupportedModelError(f"{path}: transformers cannot load model type '{model_type}' ({first})",
                                    hint="export the model to ONNX yourself and pass the .onnx file") from exc

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 8))  # batch 1 would be specialized
    seq = torch.export.Dim("seq", min=2, max=max(16, positions - 2 if positions else 4096))
    meta = {"lowbit.kind": "causal-lm", "lowbit.source": path.name, "lowbit.tokenizer": str(path.resolve()),
            "lowbit.arch": model_type}
    if positions:
        meta["lowbit.context"] = str(positions)
    logger.info("%s: model type '%s' is exported by torch (the decoder builder does not describe it)", path,
                model_type)
    return export_module(Logits(model), (ids,), input_names=["input_ids"], output_names=["logits"],
                         dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256), 1: seq},), metadata=meta)
