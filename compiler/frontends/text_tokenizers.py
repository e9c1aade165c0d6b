"""Tokenizers for calibration, eval and generation: llama2.c files, Hugging Face folders, GGUF metadata.

:func:`load_tokenizer` turns what a model records as ``lowbit.tokenizer`` (or ``--tokenizer``) into an
object with ``encode(text, bos=True) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``bos``,
``eos``:

* a llama2.c ``tok*.bin`` → :class:`lowbit.tokenizers.Llama2cTokenizer`;
* a Hugging Face folder (or its ``tokenizer.json``) → :class:`HFTokenizer` (``transformers``);
* a ``.gguf`` file → its ``tokenizer.ggml.*`` metadata: ``llama`` (SentencePiece BPE by merge score,
  byte fallback) as a :class:`SentencePieceTokenizer`; ``gpt2`` (byte-level BPE with the merges list)
  built with the ``tokenizers`` library, pre-tokenizer chosen from ``tokenizer.ggml.pre``.

``encode(text, bos=True)`` starts the sequence with a document separator: the BOS token when the
tokenizer adds one, otherwise ``<|endoftext|>`` when the vocabulary has it (GPT-2 style), else EOS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.data.tokenizers import Llama2cTokenizer

__all__ = ["load_tokenizer", "HFTokenizer", "SentencePieceTokenizer", "BPETokenizer"]

logger = logging.getLogger(__name__)

# pre-tokenizer regexes of tokenizer.ggml.pre values (as llama.cpp's converter names them)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _separator(bos, eos, vocab: dict, adds_bos: bool):
    if adds_bos and bos is not None:
        return bos
    return vocab.get("<|endoftext|>", eos if eos is not None else bos)


class HFTokenizer:
    """A Hugging Face tokenizer folder, through ``transformers.AutoTokenizer`` (offline)."""

    def __init__(self, folder: str | Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder}: no usable tokenizer ({exc})",
                                 hint="the folder needs tokenizer.json or the tokenizer's vocabulary files") from exc
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        adds = self.tok("a", add_special_tokens=True)["input_ids"]
        self.separator = _separator(self.bos, self.eos, self.tok.get_vocab(), bool(adds) and adds[0] == self.bos)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.separator] if bos and self.separator is not None else []) + ids + \
            ([self.eos] if eos and self.eos is not None else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer(Llama2cTokenizer):
    """GGUF ``llama`` vocabularies: llama2.c's score-ordered merges over the file's pieces."""

    def __init__(self, pieces: list[str], scores: list[float], bos: int, eos: int, source: str):
        if any(pieces[i + 3] != f"<0x{i:02X}>" for i in range(256)) if len(pieces) > 259 else True:
            raise UnsupportedModelError(f"{source}: SentencePiece vocabulary without byte tokens at ids 3..258",
                                        hint="pass --tokenizer with the model's Hugging Face tokenizer folder")
        self.path = Path(source)
        self.pieces = [p.replace("\u2581", " ").encode("utf-8") for p in pieces]
        self.scores = list(scores)
        self.max_token_length = max(len(p) for p in self.pieces)
        self.lookup = {p: i for i, p in enumerate(self.pieces)}
        self.bos, self.eos, self.separator = bos, eos, bos


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from GGUF metadata, built with the ``tokenizers`` library."""

    def __init__(self, f: dict, source: str):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        tokens = list(f["tokenizer.ggml.tokens"])
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
        pre = f.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in ("default", "gpt2", "gpt-2"):
            pt = byte_level
        elif pre == "smollm":
            pt = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            pattern = _QWEN2 if pre == "qwen2" else _LLAMA3
            pt = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raise UnsupportedModelError(f"{source}: GGUF pre-tokenizer '{pre}' is not implemented",
                                        hint="supported: default/gpt2, smollm, llama-bpe, qwen2; or pass "
                                             "--tokenizer with the model's Hugging Face tokenizer folder")
        self.tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        self.tok.pre_tokenizer = pt
        self.tok.decoder = decoders.ByteLevel()
        types = list(f.get("tokenizer.ggml.token_type", []))
        special = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # control, user-defined
        self.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        self.bos, self.eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
        self.separator = _separator(self.bos, self.eos, vocab, bool(f.get("tokenizer.ggml.add_bos_token", False)))
        self.vocab_size = len(tokens)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.separator] if bos else []) + ids + ([self.eos] if eos and self.eos is not None else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _gguf_tokenizer(path: Path):
    from lowbit.frontends.gguf_file import _reader, gguf_fields

    f = gguf_fields(_reader(path))
    kind = f.get("tokenizer.ggml.model")
    if kind == "llama":
        return SentencePieceTokenizer(list(f["tokenizer.ggml.tokens"]), list(f["tokenizer.ggml.scores"]),
                                      int(f.get("tokenizer.ggml.bos_token_id", 1)),
                                      int(f.get("tokenizer.ggml.eos_token_id", 2)), str(path))
    if kind == "gpt2":
        return BPETokenizer(f, str(path))
    raise UnsupportedModelError(f"{path}: GGUF tokenizer model '{kind}' is not supported",
                                hint="supported: llama (SentencePiece), gpt2 (byte-level BPE); or pass --tokenizer")


def load_tokenizer(source, vocab_size: int | None = None):
    """A tokenizer object from a path (llama2.c file, HF folder or tokenizer.json, GGUF); objects pass through."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source)
    if path.is_dir() or path.name == "tokenizer.json":
        return HFTokenizer(path if path.is_dir() else path.parent)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such tokenizer file or folder", hint="check --tokenizer")
    if path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    return Llama2cTokenizer(path, vocab_size)
