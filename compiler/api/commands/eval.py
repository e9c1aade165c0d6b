"""``lowbit eval MODEL (--ppl TEXT | --sts CSV) [--reference FLOAT_MODEL]``.

Perplexity of a causal LM on a text file (stories separated by <|endoftext|>), or STS Spearman of
an encoder on an STS-benchmark csv; with --reference, also the agreement between the two models
(next-token top-1 agreement and KL for a causal LM, embedding cosine for an encoder).
"""

from __future__ import annotations

from lowbit.api.cli import emit


def register(sub) -> None:
    from lowbit.api.options import encoding, int_range, story_slice

    p = sub.add_parser("eval", help="perplexity, STS Spearman, agreement with a float model", description=__doc__)
    p.add_argument("model", help=".onnx file (or anything 'lowbit compile' accepts, evaluated in float)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ppl", metavar="TEXT", help="perplexity on this text file")
    what.add_argument("--sts", metavar="CSV", help="STS-benchmark Spearman on this csv")
    p.add_argument("--reference", metavar="FLOAT_MODEL", help="also report agreement with this model")
    p.add_argument("--tokenizer", help="tokenizer, if the model does not record one")
    p.add_argument("--stories", type=story_slice, default=story_slice(":"), metavar="A:B",
                   help="use stories A..B-1 of the text (0 <= A < B; either may be left out)")
    p.add_argument("--seq-len", type=int_range(2, 1 << 20), default=512, help="tokens per window (>= 2)")
    p.add_argument("--encoding", type=encoding, default="utf-8", help="text encoding of --ppl/--sts (default utf-8)")
    p.add_argument("--cache", action="store_true",
                   help="score token by token through the KV cache (a KV-cache model; sources are loaded in that form)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowbit.api.evaluate import evaluate

    result = evaluate(args.model, ppl=args.ppl, sts=args.sts, reference=args.reference, tokenizer=args.tokenizer,
                      stories=args.stories.slice(), seq_len=args.seq_len, encoding=args.encoding, cache=args.cache)

    def human():
        for k, v in result.items():
            print(f"{k:>12}: {v}")

    emit(args, result, human)
    return 0
