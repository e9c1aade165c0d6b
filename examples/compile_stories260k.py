"""Compile the real stories260K (llama2.c) to W8A8, then compare perplexity and generation with FP32.

    python examples/compile_stories260k.py [--recipe w8a8] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, read_stories
from lowbit.runtime.llm import greedy_generate, perplexity, token_stream
from lowbit.ir.sessions import make_session
from lowbit.data.tokenizers import Llama2cTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--data", default=os.environ.get("LOWBIT_DATA", "../shared/data"))
    ap.add_argument("--output", default="out/stories260K.w8a8.onnx")
    args = ap.parse_args()
    data = Path(args.data)
    ckpt, tok_path = data / "stories260K/stories260K.bin", data / "stories260K/tok512.bin"
    text = data / "tinystories/tinystories_hf_validation_head.eot.txt"
    tok = Llama2cTokenizer(tok_path)
    stories = read_stories(text)
    from lowbit.data.datasets import causal_lm_feeds

    result = lowbit.compile(ckpt, args.recipe, tokenizer=tok_path, output=args.output,
                            calibration=causal_lm_feeds(tok, stories[CALIB_STORIES], 256))
    stream = token_stream(tok, stories[EVAL_STORIES][:100])
    for name, model in (("fp32", lowbit.load_model(ckpt)), (args.recipe, result.output)):
        sess = make_session(model)
        ppl = perplexity(sess, stream).ppl
        sample = tok.decode(greedy_generate(sess, [1], 30))
        print(f"{name:>8}: perplexity {ppl:.3f} on {len(stream):,} held-out tokens | {sample!r}")


if __name__ == "__main__":
    main()
