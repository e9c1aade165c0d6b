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
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.errors import CalibrationError

__all__ = ["read_stories", "read_sentences", "read_sts", "causal_lm_feeds", "encoder_feeds",
           "load_calibration", "kv_prefill_feed", "CALIB_STORIES", "TUNE_STORIES", "REPORT_STORIES", "EVAL_STORIES",
           "STORY_SLICES", "data_dir", "model_kind"]

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


def read_stories(path: str | Path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


def read_sentences(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_sts(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    a, b, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            scores.append(float(row[4]))
            a.append(row[5])
            b.append(row[6])
    if not scores:
        raise CalibrationError(f"{path}: no STS rows (tab-separated: genre, file, year, id, score, s1, s2)")
    return a, b, np.array(scores)


def causal_lm_feeds(tokenizer, stories: list[str], seq_len: int = 256, input_name: str = "tokens") -> list[dict]:
    feeds = []
    for story in stories:
        ids = tokenizer.encode(story, bos=True)[:seq_len]
        feeds.append({input_name: np.array([ids], dtype=np.int64)})
    return feeds


def encoder_feeds(tokenizer_dir: str | Path, sentences: list[str], input_names: list[str], batch: int = 16,
                  max_length: int = 128) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    feeds = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds.append({n: enc[n].astype(np.int64) if n in enc else np.zeros_like(enc["input_ids"], np.int64)
                      for n in input_names})
    return feeds


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


def load_calibration(model: ir.Model, source, *, tokenizer=None, limit: int | None = None,
                     seq_len: int = 256) -> list[dict]:
    """Feeds from a text file (stories or sentences), a directory of ``.npz`` files, or a list."""
    if source is None:
        return []
    if isinstance(source, list):
        return source[:limit] if limit else source
    path = Path(source)
    inputs = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise CalibrationError(f"{path}: no .npz files", hint="save each sample with np.savez(f, **inputs)")
        feeds = []
        for f in files[:limit] if limit else files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    feeds.append({k: z[k] for k in z.files})
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays, garbage, truncation
                raise CalibrationError(f"{f}: not a readable .npz of numeric arrays ({exc})",
                                       hint="save each sample with np.savez(f, **inputs); pickled objects are refused") from exc
        return feeds
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    kind = model_kind(model)
    if kind == "encoder":
        if path.suffix == ".csv":  # an STS-benchmark file: use its sentences
            a, b, _ = read_sts(path)
            sentences = [x for pair in zip(a, b) for x in pair]
        else:
            sentences = read_sentences(path)
        sentences = sentences[: (limit or 0) * 16 or None]
        tok_dir = tokenizer or model.metadata_props.get("lowbit.tokenizer")
        if not tok_dir:
            raise CalibrationError("text calibration for an encoder needs its tokenizer folder", hint="pass --tokenizer DIR")
        feeds = encoder_feeds(tok_dir, sentences, inputs)
    else:
        stories = read_stories(path)[:limit]
        if model.metadata_props.get("lowbit.kv_cache") == "true":  # prefill samples with an empty past
            from lowbit.frontends.decoder import prefill_feeds

            return prefill_feeds(model, causal_lm_feeds(_tokenizer_for(model, tokenizer), stories, seq_len, "ids"))
        if len(inputs) != 1:
            raise CalibrationError(f"text calibration expects a causal LM with one token input, the model has {inputs}",
                                   hint="give a directory of .npz samples instead")
        feeds = causal_lm_feeds(_tokenizer_for(model, tokenizer), stories, seq_len, inputs[0])
    if not feeds:
        raise CalibrationError(f"{path}: holds no samples")
    return feeds
