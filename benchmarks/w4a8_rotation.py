"""W4A8 with static per-tensor int8 activations: does rotation beat no rotation (and smoothing)?

    python benchmarks/w4a8_rotation.py [--eval-stories N]

stories260K, GPTQ 4-bit group 128 weights, calibrated static int8 activations (`quantize-acts{static=true}`);
calibration on TinyStories stories 0–99, perplexity on the held-out stories 600–784.
"""

from __future__ import annotations

import argparse

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, read_stories
from lowbit.runtime.llm import perplexity, token_stream
from lowbit.ir.sessions import make_session
from lowbit.data.tokenizers import Llama2cTokenizer

BASE = ("calibrate{hessian=true},quantize-weights{bits=4,group=128,method=gptq},"
        "quantize-acts{bits=8,static=true,exclude=lm_head},lower-nbits")
VARIANTS = {"none": BASE, "smooth": "calibrate,smooth{alpha=0.5}," + BASE, "rotate": "fold-norms,rotate," + BASE,
            "rotate+smooth": "fold-norms,rotate,calibrate,smooth{alpha=0.5}," + BASE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-stories", type=int, default=393)
    args = ap.parse_args()
    d = data_dir()
    tok = Llama2cTokenizer(d / "stories260K/tok512.bin")
    stories = read_stories(d / "tinystories/tinystories_hf_validation_head.eot.txt")
    feeds = causal_lm_feeds(tok, stories[CALIB_STORIES], 256)
    stream = token_stream(tok, stories[EVAL_STORIES][: args.eval_stories])
    fp32 = perplexity(make_session(lowbit.load_model(d / "stories260K/stories260K.bin")), stream).ppl
    print(f"stories260K W4A8 (static int8 activations), {len(stream):,} held-out tokens; FP32 ppl {fp32:.4f}")
    for name, pipeline in VARIANTS.items():
        result = lowbit.compile(d / "stories260K/stories260K.bin", pipeline, calibration=feeds, progress=False)
        print(f"{name:>14}: ppl {perplexity(make_session(result.model), stream).ppl:.4f}")


if __name__ == "__main__":
    main()
