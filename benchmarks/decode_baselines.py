"""The baselines of ``benchmarks/decode.py``: onnxruntime-genai's model builder and llama.cpp (llama-cpp-python).

Both are driven through the runner interface of ``decode.py``: ``reset()`` forgets the cache, ``extend(ids)`` runs
a chunk of tokens after the cached ones, ``decode()`` runs one single-token step (the timed unit).
Random weights: speed only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["GenaiRunner", "LlamaCppRunner", "genai_build", "gguf_build", "write_hf_folder"]


def write_hf_folder(cfg, w: dict, hf: Path) -> None:
    """A Hugging Face Llama folder holding llama2.c random weights ``w`` (one safetensors shard per layer, written
    straight from numpy: no torch model in memory).  llama2.c's interleaved RoPE layout is not permuted to HF's
    halves, which changes the function but not the speed."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig as HFConfig

    hf.mkdir(parents=True, exist_ok=True)
    HFConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
             max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
             torch_dtype="float32", architectures=["LlamaForCausalLM"]).save_pretrained(hf)
    roles = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    shards = {"model-outer.safetensors": {"model.embed_tokens.weight": w["embed"], "lm_head.weight": w["head"],
                                          "model.norm.weight": w["final_norm"]}}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        t = {p + dst + ".weight": w[src][i] for src, dst in roles.items()}
        t[p + "input_layernorm.weight"] = w["attn_norm"][i]
        t[p + "post_attention_layernorm.weight"] = w["ffn_norm"][i]
        shards[f"model-layer{i:02d}.safetensors"] = t
    index, total = {}, 0
    for fname, tensors in shards.items():
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        save_file(tensors, str(hf / fname), metadata={"format": "pt"})
        index.update({k: fname for k in tensors})
        total += sum(v.nbytes for v in tensors.values())
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": index}))
    from tokenizers import Tokenizer, models  # the builder copies a tokenizer into its output

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0")).save(
        str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def genai_build(hf: Path, out: Path, precision: str, cache: Path) -> Path:
    """onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``) for the CPU."""
    if not (out / "genai_config.json").exists():
        res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                              "-p", precision, "-e", "cpu", "-c", str(cache)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"onnxruntime-genai's builder failed ({precision}):\n{res.stderr[-3000:]}")
    return out


class GenaiRunner:
    """A builder output through onnxruntime-genai's ``Generator``.  ``extend`` is ``append_tokens`` on a fresh
    generator (the cache is rebuilt for every context); ``decode`` is ``generate_next_token``, which runs the model
    on the token it sampled before (the first call after ``append_tokens`` only samples: it is made untimed)."""

    def __init__(self, out: Path, threads: int, max_length: int):
        import onnxruntime_genai as og

        conf = json.loads((out / "genai_config.json").read_text())
        conf["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (out / "genai_config.json").write_text(json.dumps(conf, indent=1))
        self._og, self.model, self.max_length = og, og.Model(str(out)), max_length
        self.g = None

    def reset(self) -> None:
        self.g = None

    def extend(self, ids) -> None:
        if self.g is not None:
            raise RuntimeError("GenaiRunner: extend after decode (reset first)")
        p = self._og.GeneratorParams(self.model)
        p.set_search_options(max_length=self.max_length, do_sample=False)
        self.g = self._og.Generator(self.model, p)
        self.g.append_tokens(np.asarray(ids, dtype=np.int32))
        self.g.generate_next_token()  # samples from the prefill's logits; runs no model

    def decode(self, token) -> None:
        self.g.generate_next_token()

    fresh_extend = True  # extend() cannot follow decode(): contexts restart from an empty cache


class LlamaCppRunner:
    """A GGUF through llama-cpp-python's ``Llama`` (``eval``: the logits of the last token, like the others).

    The package is imported as installed, or from ``py_dir`` (an unpacked llama-cpp-python sdist) with the
    llama.cpp libraries built from that sdist in ``lib_dir`` (the package's own ``LLAMA_CPP_LIB_PATH``)."""

    fresh_extend = False

    def __init__(self, gguf: Path, threads: int, n_ctx: int, py_dir: str | None = None, lib_dir: str | None = None):
        if lib_dir:
            os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
        if py_dir and str(py_dir) not in sys.path:
            sys.path.insert(0, str(py_dir))
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=512, verbose=False)

    def reset(self) -> None:
        self.llm.reset()

    def extend(self, ids) -> None:
        self.llm.eval([int(t) for t in ids])

    def decode(self, token) -> None:
        self.llm.eval([int(token)])

    def close(self) -> None:
        self.llm.close()


def gguf_build(bin_dir: Path, gguf_dir: Path, layers: int, qtype: str) -> Path:
    """A random-weight GGUF of the same shape: decode_kernels' F16 writer, then ``llama-quantize``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import decode_kernels

    decode_kernels.LAYERS = layers
    return decode_kernels.prepare_gguf(bin_dir, gguf_dir, qtype)
