"""Calibration and evaluation data: text files, STS csv, ``.npz`` directories → ORT feeds.

Standard slices of the shared TinyStories file (``tinystories_hf_validation_head.eot.txt``,
785 stories), used by benchmarks, tests and the choice of recipe defaults, pairwise disjoint:

* calibration: stories ``[0, 100)`` (``CALIB_STORIES``)
* tuning — choosing defaults (group sizes, clip grids, damping, recipes): ``[100, 400)`` (``TUNE_STORIES``)
* reporting — the numbers quoted, never used to choose anything: ``[600, 785)`` (``REPORT_STORIES``;
  ``EVAL_STORIES`` is the same slice, the held-out evaluation text of tests and benchmarks)

Stories ``[400, 600)`` are left unused as a guard band.
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.errors import CalibrationError

__all__ = ["read_stories", "iter_stories", "story_chars", "load_hf_tokenizer", "read_sentences", "read_sts",
           "causal_lm_feeds", "encoder_feeds", "load_calibration", "kv_prefill_feed", "CALIB_STORIES", "TUNE_STORIES",
           "REPORT_STORIES", "EVAL_STORIES", "STORY_SLICES", "data_dir", "model_kind"]

logger = logging.getLogger(__name__)

CALIB_STORIES = slice(0, 100)
TUNE_STORIES = slice(100, 400)
REPORT_STORIES = slice(600, 785)
EVAL_STORIES = REPORT_STORIES
STORY_SLICES = {"calib": CALIB_STORIES, "tune": TUNE_STORIES, "report": REPORT_STORIES}


def data_dir() -> Path:
    """The shared data folder: env ``LOWBIT_DATA``, default ``../shared/data`` from the repo root."""
    env = os.environ.get("LOWBIT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def model_kind(model: ir.Model) -> str:
    kind = model.metadata_props.get("lowbit.kind")
    if kind:
        return kind
    names = {v.name for v in model.graph.inputs}
    if "input_ids" in names and "attention_mask" in names:
        return "encoder"
    return "causal-lm"


def iter_stories(path: str | Path, *, encoding: str = "utf-8", max_chars: int | None = None, what: str = "text"):
    """Stories of ``path`` (separated by ``<|endoftext|>``), streamed; each cut to ``max_chars`` if given."""
    from lowbit.files import iter_records

    return iter_records(path, what, "<|endoftext|>", encoding=encoding, max_chars=max_chars)


def read_stories(path: str | Path, *, encoding: str = "utf-8", what: str = "text") -> list[str]:
    return list(iter_stories(path, encoding=encoding, what=what))


def read_sentences(path: str | Path, *, encoding: str = "utf-8", limit: int | None = None,
                   what: str = "text") -> list[str]:
    from lowbit.files import iter_records

    out = []
    for line in iter_records(path, what, "\n", encoding=encoding, max_chars=1 << 16):
        out.append(line)
        if limit is not None and len(out) >= limit:
            break
    return out


def read_sts(path: str | Path, *, encoding: str = "utf-8", what: str = "STS csv") -> tuple[list[str], list[str], np.ndarray]:
    """Pairs and scores of an STS-benchmark file (tab-separated: genre, file, year, id, score, s1, s2).

    A first line whose score column is not a number is a header and is skipped; a later one is refused."""
    import math

    from lowbit.errors import InputError
    from lowbit.files import iter_records

    a, b, scores = [], [], []
    for lineno, line in enumerate(iter_records(path, what, "\n", encoding=encoding, max_chars=1 << 20), 1):
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(row) < 7:
            continue
        try:
            score = float(row[4])
        except ValueError:
            if not scores:
                continue  # a header line
            raise InputError(f"{what} '{path}': line {lineno}: score column '{row[4][:20]}' is not a number",
                             hint="columns: genre, file, year, id, score, sentence 1, sentence 2") from None
        if not math.isfinite(score):
            raise InputError(f"{what} '{path}': line {lineno}: score {row[4]} is not finite")
        scores.append(score)
        a.append(row[5])
        b.append(row[6])
    if not scores:
        raise CalibrationError(f"{path}: no STS rows (tab-separated: genre, file, year, id, score, s1, s2)")
    return a, b, np.array(scores)


def causal_lm_feeds(tokenizer, stories: list[str], seq_len: int = 256, input_name: str = "tokens") -> list[dict]:
    feeds = []
    cap = story_chars(tokenizer, seq_len)
    for story in stories:
        ids = tokenizer.encode(story[:cap], bos=True)[:seq_len]  # never tokenize more than seq_len can keep
        feeds.append({input_name: np.array([ids], dtype=np.int64)})
    return feeds


def story_chars(tokenizer, seq_len: int) -> int:
    """Characters of a story that are sure to cover its first ``seq_len`` tokens (a token spans at most
    ``max_token_length`` bytes), with a margin so merges at the cut cannot reach the kept tokens."""
    longest = max(1, int(getattr(tokenizer, "max_token_length", 16) or 16))
    return 2 * seq_len * longest + 64


def encoder_feeds(tokenizer_dir: str | Path, sentences: list[str], input_names: list[str], batch: int = 16,
                  max_length: int = 128) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = load_hf_tokenizer(tokenizer_dir)
    feeds = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                      for n in input_names})
    return feeds


def load_hf_tokenizer(tokenizer_dir):
    """A Hugging Face tokenizer from a local folder; a folder that holds none is a clear error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise CalibrationError(f"tokenizer '{tokenizer_dir}' is not a folder; an encoder needs its Hugging Face "
                               "tokenizer folder", hint="pass --tokenizer DIR (the model's folder)")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 — transformers raises OSError/ValueError/KeyError for unusable folders
        raise CalibrationError(f"tokenizer folder '{tokenizer_dir}': not a usable Hugging Face tokenizer "
                               f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                               hint="pass the folder of the model's tokenizer (tokenizer.json or vocab.txt)") from None


def _tokenizer_for(model: ir.Model, tokenizer):
    from lowbit.frontends.text_tokenizers import load_tokenizer

    path = tokenizer or model.metadata_props.get("lowbit.tokenizer")
    if not path:
        raise CalibrationError("text calibration for a causal LM needs its tokenizer", hint="pass --tokenizer tok.bin")
    return load_tokenizer(path)


def kv_prefill_feed(model: ir.Model, ids: np.ndarray) -> dict:
    """A prefill feed for a KV-cache graph: ``ids`` [batch, seq], all-ones mask, positions 0.., empty past."""
    ids = np.asarray(ids, dtype=np.int64)
    b, s = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()}
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            dims = [b if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(v.shape)]
            feed[v.name] = np.zeros(dims, dtype=v.dtype.numpy())
    return feed


MIN_TRUSTED_TOKENS = 64  # below this, calibration statistics are too noisy to trust (a warning, not an error)


def load_calibration(model: ir.Model, source, *, tokenizer=None, limit: int | None = None,
                     seq_len: int = 256, encoding: str = "utf-8") -> list[dict]:
    """Feeds from a text file (stories or sentences), a directory of ``.npz`` files, or a list.

    Text is streamed: at most ``limit`` stories are read and each is tokenized only as far as
    ``seq_len`` tokens reach.  Files must be regular files (FIFOs and devices are refused)."""
    from lowbit.errors import InputError
    from lowbit.files import check_regular, open_regular, os_error

    if source is None:
        return []
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"calibration_samples must be a whole number >= 1, got {limit!r}",
                         hint="pass --calibration-samples N with N >= 1")
    if isinstance(source, list):
        return _warn_if_small(source[:limit] if limit else source, "the given samples")
    path = Path(source)
    inputs = [v.name for v in model.graph.inputs if not v.is_initializer()]
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise os_error(exc, path, "calibration") from None
    if is_dir:
        try:
            files = sorted(path.glob("*.npz"))
        except OSError as exc:
            raise os_error(exc, path, "calibration folder") from None
        if not files:
            raise CalibrationError(f"{path}: no .npz files", hint="save each sample with np.savez(f, **inputs)")
        feeds = []
        for f in files[:limit] if limit else files:
            try:
                with open_regular(f, "calibration sample") as fh, np.load(fh, allow_pickle=False) as z:
                    feeds.append({k: z[k] for k in z.files})
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays, garbage, truncation
                raise CalibrationError(f"{f}: not a readable .npz of numeric arrays ({exc})",
                                       hint="save each sample with np.savez(f, **inputs); pickled objects are refused") from exc
        return _warn_if_small(feeds, str(path))
    if not path.exists() and not path.is_symlink():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    check_regular(path, "calibration")
    kind = model_kind(model)
    if kind == "encoder":
        tok_dir = tokenizer or model.metadata_props.get("lowbit.tokenizer")
        if not tok_dir:
            raise CalibrationError("text calibration for an encoder needs its tokenizer folder", hint="pass --tokenizer DIR")
        if path.suffix == ".csv":  # an STS-benchmark file: use its sentences
            a, b, _ = read_sts(path, encoding=encoding, what="calibration")
            sentences = [x for pair in zip(a, b) for x in pair]
        else:
            sentences = read_sentences(path, encoding=encoding, limit=(limit or 0) * 16 or None, what="calibration")
        sentences = sentences[: (limit or 0) * 16 or None]
        feeds = encoder_feeds(tok_dir, sentences, inputs) if sentences else []
    else:
        import itertools

        from lowbit.data.lm_feeds import context_length, lm_feeds

        tok = _tokenizer_for(model, tokenizer)
        seq_len = min(seq_len, context_length(model) or seq_len)  # never longer than the model's context
        stories = list(itertools.islice(iter_stories(path, encoding=encoding, max_chars=story_chars(tok, seq_len),
                                                     what="calibration"), limit))
        if model.metadata_props.get("lowbit.kv_cache") == "true":  # prefill samples with an empty past
            from lowbit.frontends.decoder import prefill_feeds

            return _warn_if_small(prefill_feeds(model, causal_lm_feeds(tok, stories, seq_len, "ids")), str(path))
        feeds = lm_feeds(model, [tok.encode(s, bos=True) for s in stories], max_len=seq_len)
    if not feeds:
        raise CalibrationError(f"{path}: holds no samples")
    return _warn_if_small(feeds, str(path))


def _warn_if_small(feeds: list, where: str) -> list:
    tokens = 0
    for feed in feeds:
        if isinstance(feed, dict):
            arrays = [np.asarray(v) for v in feed.values() if hasattr(v, "shape")]
            tokens += max((a.size for a in arrays), default=0)
    if feeds and tokens < MIN_TRUSTED_TOKENS:
        logger.warning("calibration from %s holds only %d token(s)/values (< %d): activation ranges and smoothing "
                       "scales from so little data are unreliable; give more calibration text", where, tokens,
                       MIN_TRUSTED_TOKENS)
    return feeds
