"""``lowbit eval MODEL (--ppl TEXT | --sts CSV) [--reference FLOAT_MODEL]``.

Perplexity of a causal LM on a text file (stories separated by <|endoftext|>), or STS Spearman of
an encoder on an STS-benchmark csv; with --reference, also the agreement between the two models
(next-token top-1 agreement and KL for a causal LM, embedding cosine for an encoder).
"""

from __future__ import annotations

from lowbit.api.cli import emit


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, STS Spearman, agreement with a float model", description=__doc__)
    p.add_argument("model", help=".onnx file (or anything 'lowbit compile' accepts, evaluated in float)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ppl", metavar="TEXT", help="perplexity on this text file")
    what.add_argument("--sts", metavar="CSV", help="STS-benchmark Spearman on this csv")
    p.add_argument("--reference", metavar="FLOAT_MODEL", help="also report agreement with this model")
    p.add_argument("--tokenizer", help="tokenizer, if the model does not record one")
    p.add_argument("--stories", default=":", metavar="A:B", help="use stories A..B of the text (Python slice)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--cache", action="store_true",
                   help="score token by token through the KV cache (a KV-cache model; sources are loaded in that form)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _session(model_arg, tokenizer, kv_cache: bool = False):
    from pathlib import Path

    from lowbit.frontends import load_model
    from lowbit.ir.sessions import make_session

    model = load_model(model_arg, tokenizer=tokenizer, kv_cache=kv_cache and not str(model_arg).endswith(".onnx"))
    return make_session(model if not str(model_arg).endswith(".onnx") else Path(model_arg)), model


def _slice(text: str) -> slice:
    a, _, b = text.partition(":")
    return slice(int(a) if a else None, int(b) if b else None)


def run(args) -> int:
    from lowbit.errors import LowbitError

    sess, model = _session(args.model, args.tokenizer, kv_cache=args.cache)
    ref = _session(args.reference, args.tokenizer)[0] if args.reference else None
    result: dict = {"model": args.model}
    if args.ppl:
        from lowbit.data.datasets import read_stories
        from lowbit.frontends.text_tokenizers import load_tokenizer
        from lowbit.runtime.agreement import causal_agreement
        from lowbit.runtime.kv_session import KVSession
        from lowbit.runtime.llm import perplexity, perplexity_cached, token_stream

        tok_path = args.tokenizer or model.metadata_props.get("lowbit.tokenizer")
        if not tok_path:
            raise LowbitError("perplexity needs the model's tokenizer", hint="pass --tokenizer (tok.bin, a HF folder or a .gguf)")
        stories = read_stories(args.ppl)[_slice(args.stories)]
        stream = token_stream(load_tokenizer(tok_path), stories)
        if args.cache:
            p = perplexity_cached(KVSession(sess), stream, seq_len=args.seq_len)
        else:
            p = perplexity(sess, stream, seq_len=args.seq_len)
        result.update({"path": "cache" if args.cache else "window", "text": args.ppl, "stories": len(stories),
                       "tokens": p.tokens, "nll": p.nll, "ppl": p.ppl})
        if ref is not None:
            result["agreement"] = causal_agreement(ref, sess, stream)
    else:
        from lowbit.data.datasets import read_sts
        from lowbit.runtime.agreement import embedding_agreement
        from lowbit.runtime.encoder import sts_spearman

        tok_dir = args.tokenizer or model.metadata_props.get("lowbit.tokenizer")
        if not tok_dir:
            raise LowbitError("STS needs the encoder's tokenizer folder", hint="pass --tokenizer DIR")
        a, b, scores = read_sts(args.sts)
        rho, emb = sts_spearman(sess, tok_dir, a, b, scores)
        result.update({"csv": args.sts, "pairs": len(scores), "spearman": rho})
        if ref is not None:
            ref_emb = sts_spearman(ref, tok_dir, a, b, scores)[1]
            result["agreement"] = embedding_agreement(ref_emb, emb)

    def human():
        for k, v in result.items():
            print(f"{k:>12}: {v}")

    emit(args, result, human)
    return 0
