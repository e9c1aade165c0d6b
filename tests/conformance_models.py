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

__all__ = ["ARCHS", "DECODERS", "FORMS", "build_module", "export", "feeds", "optimum_python", "save_hf", "SEQ"]

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gemma3", "gpt2", "opt", "bert")
DECODERS = tuple(a for a in ARCHS if a != "bert")
FORMS = ("dynamo", "opset23", "fp16", "external", "fixed", "optimum", "genai")
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
            if arch == "bert":
                return self.inner(input_ids=input_ids).last_hidden_state
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return Wrapped(model).eval()


def export(arch: str, form: str, folder: Path) -> Path:
    """Export ``arch`` in ``form`` into ``folder``; returns the .onnx path."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
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
        program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=opset, input_names=["input_ids"],
                                    output_names=["output"], dynamic_shapes=dynamic)
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
task = "feature-extraction" if arch == "bert" else "text-generation-with-past"
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

    model = load_onnx_model(path)  # reads the exporter's config beside the file (KV head size)
    tok = token_input(model)
    if tok is not None and tok.shape is not None and isinstance(tok.shape[1], int):
        length = tok.shape[1]  # a fixed-shape export takes exactly this many tokens
    rng = np.random.default_rng(seed)
    return lm_feeds(model, [rng.integers(1, VOCAB, length).tolist() for _ in range(n)], max_len=length)


if __name__ == "__main__":  # python tests/conformance_models.py ARCH FORM FOLDER
    print(export(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
