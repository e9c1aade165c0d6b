"""SmolLM2-135M (from its GGUF) through lowbit's recipes: perplexity on TinyStories next to FP32 and
ONNX Runtime's own ``quantize_dynamic`` on the same held-out slice.

    nice python benchmarks/smollm2_recipes.py --recipes fp32,ort-dynamic,w8a8-dynamic,w8a8,w4a8,w3a16,int8-integer-only

Calibration: stories ``--calib`` (default 0–31); evaluation: stories ``--eval`` (default 600–659), windows
of ``--seq`` tokens.  One recipe at a time; each result is appended to ``--out`` (JSON lines) as soon
as it is measured, so an interrupted run keeps what finished.  The GGUF holds Q4_1 weights
(see the data MANIFEST): "FP32" is the dequantized Q4_1 model, the reference every recipe is
compared with.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("smollm2_recipes")


def _slice(text: str) -> slice:
    a, b = text.split("-")
    return slice(int(a), int(b) + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fp32,ort-dynamic,w8a8-dynamic,w8a8,w4a8,w3a16,int8-integer-only")
    ap.add_argument("--calib", default="0-31")
    ap.add_argument("--eval", default="600-659")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="smollm2_recipes.jsonl")
    args = ap.parse_args()

    import onnxruntime as ort

    import lowbit
    from lowbit.data.datasets import data_dir, load_calibration, read_stories
    from lowbit.ir.model_io import save_onnx
    from lowbit.runtime.llm import perplexity, token_stream

    gguf = data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text = data_dir() / "tinystories" / "tinystories_hf_validation_head.eot.txt"
    stories = read_stories(text)
    model = lowbit.load_model(gguf)
    from lowbit.frontends.text_tokenizers import load_tokenizer

    tok = load_tokenizer(model.metadata_props.get("lowbit.tokenizer") or gguf)
    stream = token_stream(tok, stories[_slice(args.eval)])
    tmp = Path(tempfile.mkdtemp(prefix="smollm2_"))
    fp32 = save_onnx(model, tmp / "fp32.onnx")
    calib_file = tmp / "calib.txt"
    calib_file.write_text("<|endoftext|>".join(stories[_slice(args.calib)]), encoding="utf-8")

    def measure(path: Path) -> dict:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        p = perplexity(sess, stream, seq_len=args.seq)
        return {"ppl": round(p.ppl, 4), "tokens": p.tokens, "eval_seconds": round(time.perf_counter() - t, 1)}

    for recipe in args.recipes.split(","):
        row = {"recipe": recipe, "calib": args.calib, "eval": args.eval, "seq": args.seq}
        t = time.perf_counter()
        try:
            if recipe == "fp32":
                path = fp32
            elif recipe == "ort-dynamic":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                path = tmp / "ort_dynamic.onnx"
                quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
            else:
                path = tmp / f"{recipe}.onnx"
                res = lowbit.compile(gguf, recipe, calibration=str(calib_file), output=path,
                                     calibration_samples=None, progress=False)
                row["calibration"] = res.report.get("calibration")
                row["unsmoothed"] = len((res.report.get("smooth") or {}).get("unsmoothed", []))
            row["compile_seconds"] = round(time.perf_counter() - t, 1)
            row.update(measure(path))
        except Exception as exc:  # one recipe failing must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
