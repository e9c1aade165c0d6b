"""Frontends: every source becomes one ``ir.Model`` (ONNX IR version <= 13)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from lowbit.errors import ModelLoadError

__all__ = ["load_model", "canonicalize"]


def load_model(source, *, tokenizer: str | Path | None = None, example_inputs=None, kv_cache: bool = False,
               **kwargs) -> ir.Model:
    """Load an ``.onnx`` file, a llama2.c ``.bin`` (+ tokenizer), a Hugging Face folder, a GGUF file, an
    ``nn.Module`` (with ``example_inputs``), an ``ir.Model``, or the name ``minilm``.

    For decoders built by lowbit (llama2.c, Hugging Face, GGUF), ``kv_cache=True`` gives the graph with
    past/present key/values (see :mod:`lowbit.frontends.decoder`) instead of ``tokens → logits``."""
    if isinstance(source, ir.Model):
        return _has_kv(source, kv_cache, "the model")
    if not isinstance(source, (str, Path)):
        if hasattr(source, "forward") and hasattr(source, "parameters"):
            from lowbit.frontends.torch_module import export_module

            if example_inputs is None:
                raise ModelLoadError("a torch module needs example_inputs=(...) to be exported")
            return _has_kv(canonicalize(export_module(source, tuple(example_inputs), **kwargs)), kv_cache, "module")
        raise ModelLoadError(f"cannot load a model from a {type(source).__name__}",
                             hint="pass a path (.onnx, llama2.c .bin, HF folder), an nn.Module or an ir.Model")
    if str(source) == "minilm":
        from lowbit.frontends.huggingface import load_hf_encoder, packaged_minilm_path

        return _has_kv(load_hf_encoder(packaged_minilm_path()), kv_cache, "minilm")
    path = Path(source)
    if path.is_dir():
        from lowbit.frontends.hf_decoder import is_decoder_folder, load_hf_decoder
        from lowbit.frontends.huggingface import load_hf_encoder

        if is_decoder_folder(path):
            return load_hf_decoder(path, kv_cache=kv_cache)
        return _has_kv(load_hf_encoder(path), kv_cache, path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder", hint="check the model path")
    if path.suffix == ".bin":
        from lowbit.frontends.llama2c import load_llama2c

        if tokenizer is None:
            guess = [p for p in path.parent.glob("tok*.bin")]
            tokenizer = guess[0] if len(guess) == 1 else None
        return load_llama2c(path, tokenizer, kv_cache=kv_cache)
    if path.suffix == ".gguf":
        from lowbit.frontends.gguf_file import load_gguf

        return load_gguf(path, kv_cache=kv_cache)
    if path.suffix in (".pt", ".pth", ".pkl", ".ckpt"):
        raise ModelLoadError(f"{path}: pickled checkpoints are not loaded (they can run arbitrary code)",
                             hint="export to ONNX, or save the weights as safetensors in a Hugging Face folder")
    from lowbit.frontends.onnx_file import load_onnx_model

    return _has_kv(canonicalize(load_onnx_model(path)), kv_cache, path)


def _has_kv(model: ir.Model, kv_cache: bool, source) -> ir.Model:
    if kv_cache and not any(v.name.startswith(("past_key_values", "past_key", "past.")) for v in model.graph.inputs):
        raise ModelLoadError(f"{source}: kv_cache was asked for, but this model has no past key/value inputs",
                             hint="the KV-cache form is built for llama2.c, Hugging Face decoder folders and GGUF "
                                  "files; export an ONNX model with past/present yourself otherwise")
    return model


def canonicalize(model: ir.Model) -> ir.Model:
    """Run the ``canonicalize`` pass (Gemm → MatMul + Add, norm fusion) on a freshly loaded model."""
    from lowbit.passmanager.manager import CompileContext, PassManager

    return PassManager.from_pipeline("canonicalize", CompileContext(show_progress=False)).run(model)
