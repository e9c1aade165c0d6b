"""smooth{search=true}'s α objective, as the pass now evaluates it (float32 products, the float outputs
``rows @ w`` once per group) against the float64 form it had before (the same formula recomputing
``rows @ w`` for every candidate): the α each group gets, how far the objectives differ, and the seconds.

    nice -n 19 python benchmarks/smollm2_smooth_search.py --model stories260K
    nice -n 19 python benchmarks/smollm2_smooth_search.py --model smollm2 --layers 4

Models: stories260K (llama2.c) or SmolLM2-135M from its GGUF cut to its first ``--layers`` layers (full
widths, the tied 49152-row head included).  Calibration: ``calibrate{rows=512}`` (as ``w8a8``) on whole
TinyStories stories ``--calib`` (default 0–99, the calibration slice), 256 tokens each.  The pass's scales
follow from the α alone, so the same α in every group means the same smoothed weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def load(args):
    from lowbit.data.datasets import causal_lm_feeds, data_dir, read_stories

    d = data_dir()
    a, b = (int(x) for x in args.calib.split("-"))
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")[a:b + 1]
    if args.model == "stories260K":
        from lowbit.data.tokenizers import Llama2cTokenizer
        from lowbit.frontends.llama2c import load_llama2c

        tok_path = d / "stories260K" / "tok512.bin"
        return load_llama2c(d / "stories260K" / "stories260K.bin", tok_path), causal_lm_feeds(
            Llama2cTokenizer(tok_path), stories, 256)
    from lowbit.frontends.decoder import build_decoder
    from lowbit.frontends.gguf_file import read_gguf
    from lowbit.frontends.text_tokenizers import load_tokenizer

    gguf = d / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec, weights, _ = read_gguf(gguf)
    keep = {k: v for k, v in weights.items() if not k.startswith("layers.") or int(k.split(".")[1]) < args.layers}
    model = build_decoder(dataclasses.replace(spec, n_layers=args.layers), keep,
                          metadata={"lowbit.source": gguf.name})
    name = model.graph.inputs[0].name
    return model, causal_lm_feeds(load_tokenizer(gguf), stories, 256, input_name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("stories260K", "smollm2"), default="stories260K")
    ap.add_argument("--layers", type=int, default=4, help="SmolLM2: keep the first N layers")
    ap.add_argument("--calib", default="0-99")
    args = ap.parse_args()

    from lowbit.ir.analysis import find_groups
    from lowbit.passes.smooth import _GRID, MIN_SEARCH_ROWS, Smooth, _fake_quant_error, held_out_error
    from lowbit.passmanager.manager import CompileContext, PassManager
    from lowbit.quant.channel_scales import consumer_scales
    from lowbit.quant.stats import act_stats

    model, feeds = load(args)
    model = PassManager.from_pipeline("calibrate{rows=512}", CompileContext(calibration=feeds,
                                                                             show_progress=False)).run(model)
    scales = Smooth._scales  # uses only its arguments (self is not read)

    def errors(group, stats, dtype, shared_refs):
        rows = stats.rows.astype(dtype)
        weights = [c.weight.const_value.numpy().astype(dtype) for c in group.consumers]
        refs = [rows @ w for w in weights] if shared_refs else None
        if 2 * rows.shape[0] <= stats.count:
            return {a: _fake_quant_error(rows, weights, np.ones(rows.shape[1]) if a is None else
                                         consumer_scales(group, scales(None, group, a)), refs=refs)
                    for a in (None, *_GRID)}
        return {a: held_out_error(rows, weights, np.ones_like if a is None else
                                  (lambda xmax, a=a: consumer_scales(group, scales(None, group, a, xmax))), refs=refs)
                for a in (None, *_GRID)}

    same, groups, t_old, t_new, worst = 0, 0, 0.0, 0.0, 0.0
    for group in find_groups(model.graph):
        stats = act_stats(group.activation)
        if group.kind == "none" or stats is None or stats.rows is None or stats.rows.shape[0] < MIN_SEARCH_ROWS:
            continue
        t = time.process_time()
        old = errors(group, stats, np.float64, False)
        t_old += time.process_time() - t
        t = time.process_time()
        new = errors(group, stats, np.float32, True)
        t_new += time.process_time() - t
        a_old, a_new = min(old, key=old.get), min(new, key=new.get)
        rel = max(abs(new[a] / old[a] - 1) for a in old if old[a] > 0)
        worst = max(worst, rel)
        groups += 1
        same += a_old == a_new
        names = ",".join(c.name for c in group.consumers)
        print(f"{names[:70]:70s} α float64 {a_old!s:>4} float32 {a_new!s:>4}  objective rel diff {rel:.1e}"
              + ("" if a_old == a_new else f"  (float64 errors {old[a_old]:.6g} / {old[a_new]:.6g})"))
    print(f"{args.model}: {same}/{groups} groups choose the same α; largest relative objective difference "
          f"{worst:.1e}; α search CPU seconds float64 {t_old:.1f}, float32 + shared rows@w {t_new:.1f}")


if __name__ == "__main__":
    main()
