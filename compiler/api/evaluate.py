"""``lowbit.evaluate``: perplexity of a causal LM or STS Spearman of an encoder (what ``lowbit eval`` prints).

Inputs are checked at the door: the slice of stories must select text, the window must hold at least
two tokens, the tokenizer must fit the model (an encoder's folder is not a llama2.c ``tok*.bin``), and
an evaluation over zero tokens or pairs is refused rather than reported as ``ppl 1.0``.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from lowbit.errors import InputError, LowbitError

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def _session(model_arg, tokenizer, kv_cache: bool = False):
    from lowbit.api.preflight import check_model_source
    from lowbit.frontends import load_model
    from lowbit.ir.sessions import make_session

    check_model_source(model_arg)
    model = load_model(model_arg, tokenizer=tokenizer, kv_cache=kv_cache and not str(model_arg).endswith(".onnx"))
    return make_session(model if not str(model_arg).endswith(".onnx") else Path(model_arg)), model


def _stories(stories) -> slice:
    from lowbit.api.options import StorySlice, story_slice

    if isinstance(stories, slice):
        text = f"{'' if stories.start is None else stories.start}:{'' if stories.stop is None else stories.stop}"
        if stories.step not in (None, 1):
            raise InputError(f"stories: a step is not supported, got {stories}")
    else:
        text = str(stories) if not isinstance(stories, StorySlice) else repr(stories)
    try:
        return story_slice(text).slice()
    except Exception as exc:  # argparse.ArgumentTypeError
        raise InputError(f"stories '{text}': {exc}", hint="use A:B with 0 <= A < B, e.g. 600:785") from None


def evaluate(model, *, ppl=None, sts=None, reference=None, tokenizer=None, stories=":", seq_len: int = 512,
             encoding: str = "utf-8", cache: bool = False) -> dict:
    """Evaluate ``model`` (a path or anything ``load_model`` accepts) on ``ppl`` text or an ``sts`` csv."""
    from lowbit.api.boundary import boundary

    return boundary(_evaluate, model, ppl=ppl, sts=sts, reference=reference, tokenizer=tokenizer, stories=stories,
                    seq_len=seq_len, encoding=encoding, cache=cache, command="lowbit.evaluate")


def _evaluate(model, *, ppl, sts, reference, tokenizer, stories, seq_len, encoding, cache=False) -> dict:
    from lowbit.api.preflight import check_model_source
    from lowbit.data.datasets import model_kind
    from lowbit.files import check_encoding, check_regular

    if (ppl is None) == (sts is None):
        raise InputError("give exactly one of ppl= (a text file) or sts= (an STS csv)")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"--seq-len must be a whole number >= 2, got {seq_len!r}", hint="e.g. --seq-len 256")
    check_encoding(encoding)
    window = _stories(stories)
    check_regular(ppl if ppl is not None else sts, "--ppl text" if ppl is not None else "--sts csv")
    if tokenizer is not None:
        check_model_source(tokenizer, "tokenizer")
    sess, m = _session(model, tokenizer, kv_cache=cache)
    ref = _session(reference, tokenizer)[0] if reference else None
    kind = model_kind(m)
    result: dict = {"model": str(model)}
    if ppl is not None:
        if kind != "causal-lm":
            raise InputError(f"model '{model}' is an {kind}; perplexity needs a causal LM",
                             hint="use --sts CSV for an encoder")
        from lowbit.data.datasets import iter_stories
        from lowbit.frontends.text_tokenizers import load_tokenizer
        from lowbit.runtime.agreement import causal_agreement
        from lowbit.runtime.llm import perplexity, token_stream

        tok_path = tokenizer or m.metadata_props.get("lowbit.tokenizer")
        if not tok_path:
            raise LowbitError("perplexity needs the model's tokenizer", hint="pass --tokenizer tok.bin")
        tok = load_tokenizer(tok_path)
        vocab = _vocab(sess)
        if vocab is not None and tok.vocab_size > vocab:
            raise InputError(f"tokenizer '{tok_path}' has {tok.vocab_size} tokens but the model's vocabulary is "
                             f"{vocab}", hint="pass the tokenizer that belongs to this model")
        texts = list(itertools.islice(iter_stories(ppl, encoding=encoding, what="--ppl text"),
                                      window.start, window.stop))
        if not texts:
            raise InputError(f"--stories {window.start or 0}:{'' if window.stop is None else window.stop} selects no "
                             f"story of '{ppl}'", hint="the file holds fewer stories; choose a range inside it")
        stream = token_stream(tok, texts)
        if cache:  # token by token through the KV cache
            from lowbit.runtime.kv_session import KVSession
            from lowbit.runtime.llm import perplexity_cached

            p = _run(lambda: perplexity_cached(KVSession(sess), stream, seq_len=seq_len), model)
        else:
            p = _run(lambda: perplexity(sess, stream, seq_len=seq_len), model)
        if p.tokens == 0:
            raise InputError(f"'{ppl}': the selected stories give no token to score", hint="choose more text")
        result.update({"path": "cache" if cache else "window", "text": str(ppl), "stories": len(texts), "tokens": p.tokens, "nll": p.nll, "ppl": p.ppl})
        if ref is not None:
            result["agreement"] = causal_agreement(ref, sess, stream)
    else:
        if kind != "encoder":
            raise InputError(f"model '{model}' is a {kind}; STS needs an encoder", hint="use --ppl TEXT for a causal LM")
        from lowbit.data.datasets import read_sts
        from lowbit.runtime.agreement import embedding_agreement
        from lowbit.runtime.encoder import sts_spearman

        tok_dir = tokenizer or m.metadata_props.get("lowbit.tokenizer")
        if not tok_dir:
            raise LowbitError("STS needs the encoder's tokenizer folder", hint="pass --tokenizer DIR")
        if not Path(tok_dir).is_dir():
            raise InputError(f"tokenizer '{tok_dir}' is not a folder; an encoder needs its Hugging Face tokenizer "
                             "folder", hint="pass --tokenizer DIR (the model's folder)")
        a, b, scores = read_sts(sts, encoding=encoding, what="--sts csv")
        if len(scores) < 2:
            raise InputError(f"'{sts}': {len(scores)} STS pair(s); Spearman needs at least 2")
        from lowbit.data.datasets import load_hf_tokenizer

        rows, vocab = _embedding_rows(m), len(load_hf_tokenizer(tok_dir))
        if rows is not None and vocab > rows:
            raise InputError(f"tokenizer '{tok_dir}' has {vocab} tokens but the model embeds {rows}",
                             hint="pass the tokenizer folder that belongs to this encoder")
        rho, emb = _run(lambda: sts_spearman(sess, tok_dir, a, b, scores), model)
        result.update({"csv": str(sts), "pairs": len(scores), "spearman": rho})
        if ref is not None:
            ref_emb = sts_spearman(ref, tok_dir, a, b, scores)[1]
            result["agreement"] = embedding_agreement(ref_emb, emb)
    return result


def _run(fn, model):
    """Run an evaluation; ONNX Runtime refusing the inputs (ids past the vocabulary, wrong shapes) is the
    user's mismatch of model and data, said in one line."""
    try:
        return fn()
    except LowbitError:
        raise
    except Exception as exc:  # noqa: BLE001
        if type(exc).__module__.startswith("onnxruntime"):
            raise InputError(f"model '{model}' fails on this data in ONNX Runtime: {' '.join(str(exc).split())[:300]}",
                             hint="check that the tokenizer and --seq-len fit this model") from None
        raise


def _embedding_rows(model) -> int | None:
    """Rows of the table that ``input_ids`` index (the encoder's vocabulary), if a Gather reads it directly."""
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    for use in ids.uses() if ids is not None else []:
        node = use.node
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].shape is not None:
            return node.inputs[0].shape[0] if isinstance(node.inputs[0].shape[0], int) else None
    return None


def _vocab(sess) -> int | None:
    out = sess.get_outputs()[0].shape
    return out[-1] if out and isinstance(out[-1], int) else None
