"""SmolLM2-135M (from its GGUF) through lowbit's recipes: file bytes, perplexity on held-out TinyStories
and logits' relative L2 to float, next to FP32 and ONNX Runtime's own quantizers on the same slice.

    nice python benchmarks/smollm2_recipes.py --out smollm2.jsonl --md benchmarks/SMOLLM2_RESULTS.md

Rows: ``fp32`` (the float graph lowbit builds from the GGUF), lowbit recipes by name (``RECIPES``),
and the peers ``ort-dynamic`` (``quantize_dynamic``, int8 weights) and ``ort-hqq-bN`` /
``ort-kquant-bN`` (``MatMulNBitsQuantizer`` 4-bit, asymmetric, block N, with ``HQQWeightOnlyQuantConfig``
/ ``KQuantWeightOnlyQuantConfig``; every MatMul with a constant weight, the tied head included, at
accuracy level 0, i.e. float activations).

Calibration: stories ``--calib`` (default 0–99, the calibration slice); evaluation:
stories ``--eval`` (default 600–659, inside the reporting slice 600–784), windows of ``--seq`` tokens.
Logits' relative L2 ‖y_q − y‖/‖y‖ is taken on the first ``--l2-windows`` evaluation windows against
the FP32 graph's logits.  One row at a time; each is appended to ``--out`` (JSON lines) as soon as it is
measured, so an interrupted run keeps what finished; ``--md`` writes the table of every row in
``--out``.  The GGUF holds Q4_1 weights (see the data MANIFEST): "FP32" is the dequantized Q4_1 model,
the reference every row is compared with, and 4-bit g32 weight rows aligned with the GGUF blocks are
flattered by that grid (do not read them as 4-bit quality).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("smollm2_recipes")

# rows that are a recipe with other options (issue 14's SmolLM2 table: groups that do not align with the GGUF's
# blocks of 32); each is the named recipe's pipeline with one option replaced, run through lowbit.compile
VARIANTS = {
    "w3a16-g128": ("w3a16", "bits=3,group=16,", "bits=3,group=128,"),
    "w2a16-g64": ("w2a16", "bits=2,group=8,", "bits=2,group=64,"),
    "w4a16-gptq-g128": ("w4a16-gptq", "bits=4,group=32,", "bits=4,group=128,"),
}

# rows that are a pipeline of their own: static w8a8 with the down-projections' inputs per token (their
# attention-sink activations break a per-tensor step; see SMOLLM2_RESULTS.md and smollm2_static_acts.py)
PIPELINES = {
    "w8a8-split": "calibrate{rows=512},smooth{search=true},quantize{weights=8,acts=8,mode=static,exclude=down_proj},"
                  "quantize{weights=8,acts=8,mode=dynamic},lower-ort",
}


def pipeline_of(row: str) -> str:
    """The recipe name or pipeline string lowbit.compile gets for a lowbit row."""
    if row in PIPELINES:
        return PIPELINES[row]
    if row not in VARIANTS:
        return row
    from lowbit.passmanager.recipes import RECIPES

    name, old, new = VARIANTS[row]
    text = RECIPES[name]
    if text.count(old) != 1:
        raise RuntimeError(f"row {row}: recipe {name} no longer holds {old!r} once; update VARIANTS")
    return text.replace(old, new)


DEFAULT_ROWS = ("fp32,ort-dynamic,w8a8-dynamic,w8a8,int8-integer-only,w4a8,w4a16-gptq,w3a16,"
                "ort-hqq-b32,ort-hqq-b128,ort-kquant-b32,ort-kquant-b128")


def _slice(text: str) -> slice:
    a, b = text.split("-")
    return slice(int(a), int(b) + 1)


def file_bytes(path: Path) -> int:
    """The model file plus every external-data file beside it that it names."""
    import onnx

    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                total += (path.parent / e.value).stat().st_size
    return total


def ort_nbits(src: Path, dst: Path, algo: str, block: int) -> Path:
    """ORT's MatMulNBitsQuantizer, 4-bit asymmetric blocks of ``block``, HQQ or k-quant."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig,
                                                                 KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    cfg = (HQQWeightOnlyQuantConfig(block_size=block, bits=4) if algo == "hqq"
           else KQuantWeightOnlyQuantConfig())
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=False,
                             accuracy_level=0, algo_config=cfg)
    try:
        q.process()
    except ValueError as exc:  # ORT 1.31's k-quant packs 4-bit zero points wrongly when ceil(K/block) is odd
        raise RuntimeError(f"ORT MatMulNBitsQuantizer {algo} block {block} failed inside onnxruntime "
                           f"({exc}); k-quant cannot pack zero points for an odd number of blocks per column "
                           f"(SmolLM2's K=576 gives {-(-576 // block)} blocks)") from None
    proto = q.model.model
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(dst))
    return dst


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def write_markdown(rows: list[dict], md: Path, command: str) -> None:
    base = next((r for r in rows if r["recipe"] == "fp32" and "ppl" in r), None)
    lines = [f"Command: `{command}`", "",
             "| row | file bytes | ppl | Δ ppl vs FP32 | logits rel L2 | compile s | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: r["recipe"] != "fp32"):
        if "ppl" not in r:
            lines.append(f"| {r['recipe']} | - | - | - | - | - | **failed**: {r.get('error', '?')} |")
            continue
        d = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f} %" if base else "-"
        l2 = f"{r['rel_l2']:.4f}" if r.get("rel_l2") is not None else "-"
        note = []
        cal = r.get("calibration")
        if isinstance(cal, dict) and "tokens" in cal:
            note.append(f"calibrated on {cal.get('sequences', '?')} sequences, {cal['tokens']:,} tokens")
        if r.get("unsmoothed"):
            note.append(f"{r['unsmoothed']} linears unsmoothed")
        lines.append(f"| {r['recipe']} | {r['bytes']:,} | {r['ppl']:.3f} | {d} | {l2} | "
                     f"{r.get('compile_seconds', '-')} | {'; '.join(map(str, note))} |")
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=DEFAULT_ROWS, help="comma-separated rows; empty: only write --md")
    ap.add_argument("--calib", default="0-99")
    ap.add_argument("--eval", default="600-659")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--l2-windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="smollm2_recipes.jsonl")
    ap.add_argument("--md", default="", help="write the table of every row in --out to this markdown file")
    args = ap.parse_args()
    import sys

    command = "python " + " ".join(sys.argv)
    if not args.recipes:  # only (re)write the table of what --out holds
        rows = [json.loads(x) for x in Path(args.out).read_text(encoding="utf-8").splitlines() if x.strip()]
        write_markdown(rows, Path(args.md), command)
        return

    import onnxruntime as ort

    import lowbit
    from lowbit.data.datasets import data_dir, read_stories
    from lowbit.frontends.text_tokenizers import load_tokenizer
    from lowbit.ir.model_io import save_onnx
    from lowbit.runtime.llm import perplexity, token_stream

    gguf = data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text = data_dir() / "tinystories" / "tinystories_hf_validation_head.eot.txt"
    stories = read_stories(text)
    model = lowbit.load_model(gguf)
    tok = load_tokenizer(model.metadata_props.get("lowbit.tokenizer") or gguf)
    stream = token_stream(tok, stories[_slice(args.eval)])
    windows = np.stack([stream[i * args.seq: i * args.seq + args.seq] for i in range(args.l2_windows)])
    tmp = Path(tempfile.mkdtemp(prefix="smollm2_"))
    fp32 = save_onnx(model, tmp / "fp32.onnx")
    del model
    calib_file = tmp / "calib.txt"
    calib_file.write_text("<|endoftext|>".join(stories[_slice(args.calib)]), encoding="utf-8")

    def session(path: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = args.threads
        try:
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception:  # lowbit.MatMul3Bit (w3a16): its 3-bit codes on ORT's 4-bit kernels, exact
            from lowbit.runtime.fastpath import fast_session

            return fast_session(path, threads=args.threads)

    def logits(sess) -> np.ndarray:
        return np.concatenate([sess.run(["logits"], {sess.get_inputs()[0].name: w[None]})[0] for w in windows])

    ref_logits = logits(session(fp32))
    for recipe in args.recipes.split(","):
        row = {"recipe": recipe, "calib": args.calib, "eval": args.eval, "seq": args.seq,
               "l2_windows": args.l2_windows}
        t = time.perf_counter()
        path = None
        try:
            if recipe == "fp32":
                path = fp32
            elif recipe == "ort-dynamic":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                path = tmp / "ort_dynamic.onnx"
                quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
            elif recipe.startswith(("ort-hqq-b", "ort-kquant-b")):
                algo, block = recipe[4:].split("-b")
                path = ort_nbits(fp32, tmp / f"{recipe}.onnx", algo, int(block))
            else:
                path = tmp / f"{recipe}.onnx"
                row["pipeline"] = pipeline_of(recipe)
                res = lowbit.compile(gguf, row["pipeline"], calibration=str(calib_file), output=path,
                                     calibration_samples=None, progress=False)
                row["calibration"] = res.report.get("calibration")
                if res.timing is not None:  # where the compile time went, pass by pass
                    row["pass_seconds"] = [[name, round(sec, 1)] for name, sec, _ in res.timing.rows]
                row["unsmoothed"] = len((res.report.get("smooth") or {}).get("unsmoothed", []))
            row["compile_seconds"] = round(time.perf_counter() - t, 1)
            row["bytes"] = file_bytes(path)
            sess = session(path)
            row["rel_l2"] = round(rel_l2(logits(sess), ref_logits), 5)
            t = time.perf_counter()
            p = perplexity(sess, stream, seq_len=args.seq)
            row.update({"ppl": round(p.ppl, 4), "tokens": p.tokens, "eval_seconds": round(time.perf_counter() - t, 1)})
            del sess
        except Exception as exc:  # one row failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        finally:
            if path is not None and path != fp32:
                for f in tmp.glob(path.name + "*"):
                    f.unlink()
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        if args.md:
            rows = [json.loads(x) for x in Path(args.out).read_text(encoding="utf-8").splitlines() if x.strip()]
            write_markdown(rows, Path(args.md), command)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
