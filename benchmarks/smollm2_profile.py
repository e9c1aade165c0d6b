"""Where a SmolLM2-135M compile spends its time: cProfile of one recipe on the first ``--layers`` layers of the
real GGUF (full widths: hidden 576, FFN 1536, vocab 49152; the tied head included), so the profile runs in
well under 3 GB where the 30-layer model needs the big-memory slot.  Per-layer passes scale with the layer
count; the head and embedding costs do not.

    nice -n 19 python benchmarks/smollm2_profile.py --recipe w8a8 --layers 4 --top 25

Calibration: TinyStories stories ``--calib`` (default 0–31, whole stories, as smollm2_recipes.py).  Prints
the compile's per-pass seconds and cProfile's top functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w8a8", help="recipe name or pipeline")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calib", default="0-31")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--stats", default="", help="also dump the raw cProfile stats here")
    args = ap.parse_args()

    import lowbit
    from lowbit.data.datasets import data_dir, read_stories
    from lowbit.frontends.decoder import build_decoder
    from lowbit.frontends.gguf_file import read_gguf
    from lowbit.ir.model_io import save_onnx

    gguf = data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec, weights, _ = read_gguf(gguf)
    keep = {k: v for k, v in weights.items() if not k.startswith("layers.") or int(k.split(".")[1]) < args.layers}
    spec = dataclasses.replace(spec, n_layers=args.layers)
    model = build_decoder(spec, keep, metadata={"lowbit.source": gguf.name, "lowbit.tokenizer": str(gguf)})
    del weights, keep
    tmp = Path(tempfile.mkdtemp(prefix="smollm2_profile_"))
    src = save_onnx(model, tmp / f"smollm2_{args.layers}l.onnx")
    del model
    a, b = (int(x) for x in args.calib.split("-"))
    stories = read_stories(data_dir() / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    calib = tmp / "calib.txt"
    calib.write_text("<|endoftext|>".join(stories[a:b + 1]), encoding="utf-8")
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    try:
        res = lowbit.compile(src, args.recipe, calibration=str(calib), tokenizer=str(gguf), output=tmp / "out.onnx",
                             calibration_samples=None, progress=False)
    finally:
        prof.disable()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.recipe}, SmolLM2 first {args.layers} layers: compile {time.perf_counter() - t:.1f} s wall")
    for name, sec, _ in (res.timing.rows if res.timing else []):
        print(f"  pass {name:60s} {sec:8.1f} s")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue())
    if args.stats:
        prof.dump_stats(args.stats)


if __name__ == "__main__":
    main()
