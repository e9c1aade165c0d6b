"""``--format genai``: a folder that onnxruntime-genai's ``Generator`` and optimum's ``ORTModelForCausalLM`` load.

The folder holds

* ``model.onnx`` (+ ``model.onnx.data``): the compiled KV-cache graph, unchanged — inputs ``input_ids``,
  ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value``; outputs ``logits``,
  ``present.{i}.key/value`` (the names both pipelines expect);
* ``genai_config.json``: onnxruntime-genai's description of the decoder (layers, heads, head size, the
  input/output name templates, BOS/EOS/PAD, context length) and greedy search defaults;
* ``config.json`` + ``generation_config.json``: the Hugging Face config optimum reads (``model_type``
  from the source architecture, sizes, ``use_cache``);
* the tokenizer as Hugging Face files: ``tokenizer.json`` and ``tokenizer_config.json`` (with the
  chat template), copied from a HF folder or written from the tokenizer a GGUF file embeds.

Only float caches are drop-in (both pipelines allocate float32 past tensors themselves), so a graph
whose cache ``quantize-kv`` re-encoded is refused, as is one without a KV cache or a HF tokenizer.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from lowbit.errors import LowbitError

__all__ = ["write_genai_folder", "decoder_config"]

logger = logging.getLogger(__name__)

_HF_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gpt2": "gpt2", "opt": "opt"}


def decoder_config(model: ir.Model) -> dict:
    """The frontend's DecoderSpec fields, parsed back from the ``lowbit.config`` metadata."""
    raw = model.metadata_props.get("lowbit.config")
    if not raw:
        raise LowbitError("the model records no decoder configuration (lowbit.config)",
                          hint="--format genai needs a decoder built by lowbit (llama2.c, HF folder, GGUF)")
    out: dict = {}
    for part in raw.split(","):
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"True": True, "False": False}.get(v, v)
    return out


def _check(model: ir.Model, spec: dict) -> None:
    names = {v.name: v for v in model.graph.inputs}
    if "past_key_values.0.key" not in names:
        raise LowbitError("--format genai needs the KV-cache graph", hint="add --kv-cache to 'lowbit compile'")
    if names["past_key_values.0.key"].dtype != ir.DataType.FLOAT or any(n.endswith("_scale") for n in names):
        raise LowbitError("--format genai: onnxruntime-genai and optimum allocate float32 caches; this graph's cache "
                          "is quantized (quantize-kv)", hint="use a recipe without quantize-kv for drop-in folders")


def _tokenizer_files(model: ir.Model, folder: Path) -> dict:
    from lowbit.runtime.textcodec import load_codec

    source = model.metadata_props.get("lowbit.tokenizer")
    if not source:
        raise LowbitError("--format genai: the model records no tokenizer", hint="pass --tokenizer")
    codec = load_codec(source)
    if "tokenizer.json" in codec.files:
        for name, path in codec.files.items():
            shutil.copy(path, folder / name)
    elif codec.hf_tokenizer is not None:
        codec.hf_tokenizer.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": codec.bos_token, "eos_token": codec.eos_token,
               "unk_token": codec.eos_token, "pad_token": codec.eos_token, "add_bos_token": codec.add_bos,
               "clean_up_tokenization_spaces": False, "model_max_length": 8192,
               "model_input_names": ["input_ids", "attention_mask"]}
        if codec.chat_template:
            cfg["chat_template"] = codec.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    else:
        raise LowbitError(f"--format genai: the tokenizer '{source}' has no Hugging Face form",
                          hint="onnxruntime-genai reads tokenizer.json; use a HF folder or a GGUF byte-level BPE model")
    return {"bos": codec.bos_id, "eos": list(codec.eos_ids)}


def write_genai_folder(model: ir.Model, folder: str | Path, *, context_length: int = 2048) -> Path:
    """Write ``folder`` atomically (a temporary sibling renamed into place)."""
    from lowbit.ir.model_io import save_onnx

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise LowbitError(f"output '{folder}' exists and is not an empty folder", hint="choose a new folder path")
    spec = decoder_config(model)
    _check(model, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        special = _tokenizer_files(model, tmp)
        save_onnx(model, tmp / "model.onnx", external_data=True)
        eos = special["eos"] or [0]
        bos = special["bos"] if special["bos"] is not None else eos[0]
        layers, heads, kv_heads = spec["n_layers"], spec["n_heads"], spec["n_kv_heads"]
        genai = {
            "model": {
                "bos_token_id": bos, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": eos[0],
                "context_length": context_length, "vocab_size": spec["vocab_size"], "type": "llama",
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": "model.onnx", "head_size": spec["head_dim"], "hidden_size": spec["hidden"],
                    "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"},
                },
            },
            "search": {"do_sample": False, "num_beams": 1, "max_length": context_length, "min_length": 0,
                       "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                       "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                       "num_return_sequences": 1, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
        }
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2))
        arch = str(spec.get("arch", "llama")).lower()
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": _HF_TYPES.get(arch, "llama"),
              "hidden_size": spec["hidden"], "intermediate_size": spec["intermediate"],
              "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
              "head_dim": spec["head_dim"], "vocab_size": spec["vocab_size"], "rms_norm_eps": spec.get("norm_eps", 1e-5),
              "rope_theta": spec.get("rope_theta", 10000.0), "max_position_embeddings": context_length,
              "tie_word_embeddings": bool(spec.get("tied", True)), "bos_token_id": bos, "eos_token_id": eos[0],
              "pad_token_id": eos[0], "use_cache": True, "hidden_act": "silu"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": bos, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": eos[0]}, indent=2))
        if folder.exists():
            folder.rmdir()
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (genai_config.json, config.json, tokenizer, model.onnx)", folder)
    return folder
