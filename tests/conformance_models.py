"""Random-weight tiny Hugging Face models exported to ONNX the ways users export them.

Architectures: Llama, Qwen2 (q/k/v bias), Mistral, Phi-3 (fused qkv, gate_up), Gemma-3 (norm
offset, embedding scale, GeGLU, sandwich norms), GPT-2 (Conv1D → Gemm, learned positions), OPT
(ReLU, position offset), BERT (post-norm encoder).  Forms:

* ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` at torch's default opset (20 for torch 2.13),
  external data beside the file (the exporter's default);
* ``opset23``: the same at opset 23 (``RMSNormalization``, the ``Attention`` op);
* ``fp16``: the model in float16, exported at the default opset;
* ``external``: weights in an external data file, loaded from another working directory;
* ``fixed``: the token input pinned to ``[1, 16]`` (no dynamic axes);
* ``optimum``: ``optimum-onnx`` export with past key/values (run in ``.venv-optimum``, see
  :func:`optimum_python`: optimum needs transformers < 4.58), skipped when absent;
* ``hf``: the Hugging Face folder itself (safetensors + tokenizer; ``mpnet`` as a sentence-transformers
  folder with mean pooling and Normalize); the float reference is lowbit's own float graph of the
  folder (:func:`reference`), which ``test_hf_decoders`` checks against transformers;
* ``genai``: onnxruntime-genai's model builder (decoders; ``pip install --no-deps onnxruntime-genai``),
  skipped when absent.

Random weights of realistic shape: for graph forms and error bounds, never for quality claims.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

__all__ = ["ARCHS", "DECODERS", "ENCODERS", "EXTRA", "FORMS", "build_module", "export", "feeds", "optimum_python", "reference", "save_hf", "SEQ"]

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma3", "gpt2", "opt", "bert")
# Beyond the list: parallel residuals / partial rotary (GPT-NeoX, Phi-2, StableLM, Falcon), q/k norms
# (Qwen3), soft-capping (Gemma-2), tied embeddings, mixture-of-experts, and more encoders.
EXTRA = ("gpt_neox", "phi", "stablelm", "falcon", "qwen3", "gemma2", "llama_tied", "mixtral", "qwen2_moe",
         "roberta", "distilbert", "xlm_roberta", "modernbert", "deberta_v2", "electra", "mpnet", "starcoder2", "olmo2", "granite", "gpt_bigcode", "bloom")
ENCODERS = ("bert", "roberta", "distilbert", "xlm_roberta", "modernbert", "deberta_v2", "electra", "mpnet")
DECODERS = tuple(a for a in ARCHS if a not in ENCODERS)
FORMS = ("dynamo", "opset23", "fp16", "external", "fixed", "optimum", "genai", "hf")
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 256, 64, 2, 4, 2, 128, 128
SEQ = 16  # the fixed form's length


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=POSITIONS)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=KV_HEADS, **common), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=KV_HEADS, **common), tf.Qwen2ForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=KV_HEADS, sliding_window=None, **common), tf.MistralForCausalLM
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=HEADS, pad_token_id=0, **common), tf.Phi3ForCausalLM
    if arch == "gemma3":
        return tf.Gemma3TextConfig(num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, sliding_window=POSITIONS,
                                   **common), tf.Gemma3ForCausalLM
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                             n_positions=POSITIONS), tf.GPT2LMHeadModel
    if arch == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            ffn_dim=FFN, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN), \
            tf.OPTForCausalLM
    if arch == "bert":
        return tf.BertConfig(**common), tf.BertModel
    return _extra_config(tf, arch, common)


def _extra_config(tf, arch: str, common: dict):
    kv = dict(num_key_value_heads=KV_HEADS)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common), tf.GPTNeoXForCausalLM
    if arch == "phi":
        return tf.PhiConfig(partial_rotary_factor=0.5, **common), tf.PhiForCausalLM
    if arch == "stablelm":
        return tf.StableLmConfig(partial_rotary_factor=0.25, **kv, **common), tf.StableLmForCausalLM
    if arch == "falcon":
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, multi_query=True, parallel_attn=True, bias=False,
                               max_position_embeddings=POSITIONS), tf.FalconForCausalLM
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=HIDDEN // HEADS, **kv, **common), tf.Qwen3ForCausalLM
    if arch == "gemma2":
        return tf.Gemma2Config(head_dim=HIDDEN // HEADS, sliding_window=POSITIONS, **kv, **common), \
            tf.Gemma2ForCausalLM
    if arch == "llama_tied":
        return tf.LlamaConfig(tie_word_embeddings=True, **kv, **common), tf.LlamaForCausalLM
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **kv, **common), \
            tf.MixtralForCausalLM
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, **kv, **common), tf.Qwen2MoeForCausalLM
    if arch == "roberta":
        return tf.RobertaConfig(pad_token_id=1, **common), tf.RobertaModel
    if arch == "xlm_roberta":
        return tf.XLMRobertaConfig(pad_token_id=1, **common), tf.XLMRobertaModel
    if arch == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                   max_position_embeddings=POSITIONS), tf.DistilBertModel
    if arch == "deberta_v2":
        return tf.DebertaV2Config(**common), tf.DebertaV2Model
    if arch == "electra":
        return tf.ElectraConfig(embedding_size=HIDDEN // 2, **common), tf.ElectraModel
    if arch == "mpnet":
        return tf.MPNetConfig(**common), tf.MPNetModel
    if arch == "starcoder2":
        return tf.Starcoder2Config(use_bias=True, **kv, **common), tf.Starcoder2ForCausalLM
    # not described by lowbit's decoder builder: the HF form goes through torch's exporter (hf_exported)
    if arch == "olmo2":
        return tf.Olmo2Config(**kv, **common), tf.Olmo2ForCausalLM
    if arch == "granite":
        return tf.GraniteConfig(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                                logits_scaling=8.0, **kv, **common), tf.GraniteForCausalLM
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                   n_positions=POSITIONS, multi_query=True), tf.GPTBigCodeForCausalLM
    if arch == "bloom":
        return tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS), tf.BloomForCausalLM
    if arch == "modernbert":
        return tf.ModernBertConfig(global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
                                   bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                   **common), tf.ModernBertModel
    raise ValueError(arch)


def build_module(arch: str, seed: int = 0):
    """A random-weight HF model in eval mode (biases random too, so that folding them is tested)."""
    import torch

    torch.manual_seed(seed)
    config, cls = _config(arch)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():  # HF initialises these to 0/1
                p.add_(0.05 * torch.randn_like(p))
    return model


def _wrap(model, arch: str):
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            if arch in ENCODERS:
                return self.inner(input_ids=input_ids).last_hidden_state
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return Wrapped(model).eval()


def export(arch: str, form: str, folder: Path) -> Path:
    """Export ``arch`` in ``form`` into ``folder``; returns the .onnx path."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if form == "hf":
        return _hf_form(arch, folder)
    if form in ("optimum", "genai"):
        return _export_external_tool(arch, form, folder)
    model = build_module(arch)
    if form == "fp16":
        model = model.half()
    module = _wrap(model, arch)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    dynamic = None if form == "fixed" else {"input_ids": {1: torch.export.Dim("seq", min=2, max=POSITIONS - 2)}}
    opset = 23 if form == "opset23" else None
    sink = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=opset,
                                        input_names=["input_ids"], output_names=["output"], dynamic_shapes=dynamic)
        except Exception as exc:  # the exporter's own limits (torch 2.13 cannot export Mixtral's routing)
            import pytest

            pytest.skip(f"{form} export of {arch} failed in torch's exporter: {type(exc).__name__}")
    path = folder / f"{arch}_{form}.onnx"
    program.save(str(path), external_data=form == "external" or None)
    return path


def optimum_python() -> Path | None:
    """The Python of the ``.venv-optimum`` beside the repo root (optimum needs transformers < 4.58)."""
    root = Path(__file__).resolve().parents[1]
    py = root / ".venv-optimum" / "bin" / "python"
    return py if py.exists() else None


_OPTIMUM_SCRIPT = r'''
import sys, pathlib
sys.path.insert(0, sys.argv[4])
import conformance_models as cm
arch, out = sys.argv[1], pathlib.Path(sys.argv[3])
cm.save_hf(arch, out / "hf")
from optimum.exporters.onnx import main_export
task = "feature-extraction" if arch in cm.ENCODERS else "text-generation-with-past"
main_export(str(out / "hf"), output=str(out / "optimum"), task=task, no_post_process=True, do_validation=False)
'''


def save_hf(arch: str, folder: Path) -> Path:
    """The random-weight model as a Hugging Face folder (safetensors) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    build_module(arch).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(folder)
    return folder


def _hf_form(arch: str, folder: Path) -> Path:
    """The HF folder, plus ``reference.onnx`` beside it: lowbit's float graph of the folder (a load the
    frontend refuses skips nothing: the refusal is what the cell checks, so the reference is left out)."""
    import onnx_ir as ir

    import lowbit
    from lowbit.errors import LowbitError

    path = save_hf(arch, folder / "hf")
    if arch == "mpnet":  # sentence-transformers' all-mpnet-base-v2 layout: mean pooling, then Normalize
        import json

        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True}))
    try:
        model = lowbit.load_model(path)
    except LowbitError:
        return path
    ir.save(model, str(folder / "reference.onnx"))
    return path


def reference(src: Path) -> Path:
    """The float ONNX model a cell's outputs are compared with (the HF form's lowbit float graph)."""
    return src.parent / "reference.onnx" if src.is_dir() else src


def _run_tool(cmd: list[str], form: str, arch: str) -> None:
    import pytest

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"{form} export of {arch} failed in the exporting tool: {tail[0][:200]}")


def _export_external_tool(arch: str, form: str, folder: Path) -> Path:
    import importlib.util

    import pytest

    if form == "optimum":
        py = optimum_python()
        if py is None:
            pytest.skip("optimum exports need .venv-optimum (python -m venv .venv-optimum; .venv-optimum/bin/pip "
                        "install torch==2.13.0 'transformers<4.58' optimum-onnx)")
        script = folder / "export_optimum.py"
        script.write_text(_OPTIMUM_SCRIPT)
        _run_tool([str(py), str(script), arch, form, str(folder), str(Path(__file__).parent)], form, arch)
    else:
        if arch not in DECODERS:
            pytest.skip("the onnxruntime-genai builder exports decoders only")
        if importlib.util.find_spec("onnxruntime_genai") is None:
            pytest.skip("genai exports need onnxruntime-genai (pip install --no-deps onnxruntime-genai)")
        save_hf(arch, folder / "hf")
        _run_tool([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder / "hf"), "-o",
                   str(folder / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(folder / "cache")], form, arch)
    found = sorted((folder / form).glob("*.onnx"))
    model = [p for p in found if "decoder_model" in p.name or p.name == "model.onnx"] or found
    if not model:
        pytest.skip(f"the {form} exporter wrote no .onnx file for {arch}")
    return model[0]


def feeds(path: Path, n: int, seed: int, length: int = 12) -> list[dict]:
    """``n`` prefill feeds for the model at ``path`` (token ids < VOCAB; empty KV past)."""
    from lowbit.data.lm_feeds import lm_feeds, token_input
    from lowbit.frontends.onnx_file import load_onnx_model

    rng = np.random.default_rng(seed)
    if not reference(path).exists():  # a folder the frontend refuses: plain token feeds for the refused compile
        return [{"input_ids": rng.integers(1, VOCAB, (1, length))} for _ in range(n)]
    model = load_onnx_model(reference(path))  # reads the exporter's config beside the file (KV head size)
    tok = token_input(model)
    if tok is not None and tok.shape is not None and isinstance(tok.shape[1], int):
        length = tok.shape[1]  # a fixed-shape export takes exactly this many tokens
    return lm_feeds(model, [rng.integers(1, VOCAB, length).tolist() for _ in range(n)], max_len=length)


if __name__ == "__main__":  # python tests/conformance_models.py ARCH FORM FOLDER
    print(export(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
