"""Text ↔ token ids for generation: the model's tokenizer, its special tokens and chat template.

A model built by lowbit records its tokenizer in the metadata entry ``lowbit.tokenizer``: a
llama2.c ``tok*.bin``, a Hugging Face folder / ``tokenizer.json``, or a GGUF file (its embedded
tokenizer).  :func:`load_codec` opens any of them as a :class:`TextCodec`.

Chat templates are the Jinja2 templates tokenizers declare (``chat_template`` in
``tokenizer_config.json``, ``tokenizer.chat_template`` in GGUF); they are rendered the way
transformers' ``apply_chat_template`` does (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError, ModelLoadError

__all__ = ["TextCodec", "load_codec", "render_chat"]

logger = logging.getLogger(__name__)


@dataclass
class TextCodec:
    """encode / decode plus what generation needs to know about special tokens."""

    encode_fn: object
    decode_fn: object
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = True
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    files: dict[str, Path] = field(default_factory=dict)   # tokenizer files a deployment folder needs
    hf_tokenizer: object = None                             # a tokenizers.Tokenizer, when one was built

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = list(self.encode_fn(text))
        bos = self.add_bos if add_bos is None else add_bos
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids) -> str:
        return self.decode_fn([int(i) for i in ids])


def _llama2c(path: Path) -> TextCodec:
    from lowbit.data.tokenizers import BOS, EOS, Llama2cTokenizer

    tok = Llama2cTokenizer(path)
    return TextCodec(lambda t: tok.encode(t, bos=False), tok.decode, bos_id=BOS, eos_ids=(EOS,), add_bos=True,
                     files={"tokenizer": path})


def _hf(folder: Path) -> TextCodec:
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json" if folder.is_dir() else folder
    folder = file.parent
    tok = Tokenizer.from_file(str(file))
    cfg = {}
    if (folder / "tokenizer_config.json").exists():
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    gen = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").exists() else {}

    def token_text(v):
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    bos_tok, eos_tok = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
    bos_id = tok.token_to_id(bos_tok) if bos_tok else None
    eos = gen.get("eos_token_id", tok.token_to_id(eos_tok) if eos_tok else None)
    eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    files = {p.name: p for p in folder.iterdir()
             if p.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json", "vocab.json", "merges.txt")}
    return TextCodec(lambda t: tok.encode(t, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=True),
                     bos_id=bos_id, eos_ids=eos_ids, add_bos=bool(cfg.get("add_bos_token", False)) and bos_id is not None,
                     chat_template=template, bos_token=bos_tok, eos_token=eos_tok, files=files)


def load_codec(source: str | Path) -> TextCodec:
    """Open the tokenizer at ``source`` (llama2.c .bin, HF folder or tokenizer.json, GGUF file)."""
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: tokenizer not found", hint="pass --tokenizer with the model's tokenizer")
    if path.is_dir() or path.name.endswith(".json"):
        return _hf(path)
    if path.suffix == ".gguf":
        return _gguf(path)
    return _llama2c(path)


def _gguf(path: Path) -> TextCodec:
    """The tokenizer embedded in a GGUF file (read by lowbit's GGUF frontend) and its chat template."""
    from lowbit.frontends.gguf_file import _reader, gguf_fields
    from lowbit.frontends.text_tokenizers import load_tokenizer

    tok = load_tokenizer(path)
    f = gguf_fields(_reader(path))
    tokens = list(f.get("tokenizer.ggml.tokens", []))
    eos = [tok.eos] if tok.eos is not None else []
    if "<|endoftext|>" in tokens:  # ends a document in GPT-2-style vocabularies
        eos.append(tokens.index("<|endoftext|>"))
    add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False)) and tok.bos is not None
    codec = TextCodec(lambda t: tok.encode(t, bos=False), tok.decode, bos_id=tok.bos, eos_ids=tuple(dict.fromkeys(eos)),
                      add_bos=add_bos, chat_template=f.get("tokenizer.chat_template"),
                      bos_token=tokens[tok.bos] if tok.bos is not None and tok.bos < len(tokens) else "",
                      eos_token=tokens[tok.eos] if tok.eos is not None and tok.eos < len(tokens) else "")
    codec.hf_tokenizer = getattr(tok, "tok", None)  # a tokenizers.Tokenizer (byte-level BPE): can be saved as JSON
    return codec


def render_chat(codec: TextCodec, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` under the tokenizer's chat template (Jinja2, sandboxed)."""
    if not codec.chat_template:
        raise LowbitError("the tokenizer declares no chat template", hint="drop --chat, or give a plain --prompt")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise LowbitError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(codec.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=codec.bos_token, eos_token=codec.eos_token)
