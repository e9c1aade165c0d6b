"""int8-integer-only vs lowbit w8a8 (float rescale) vs ORT quantize_dynamic, on the real models.

Quality: MiniLM STS-test Spearman (all 1379 pairs; calibration: the first 512 distinct sentences of
STS-dev pairs 0–749, nothing tuned on the pairs 750–1499);
stories260K perplexity on EVAL_STORIES (calibration: CALIB_STORIES).  Speed: prefill latency of
one 64-token sequence, as a ratio to FP32, every variant timed round-robin in this one run
(median over rounds).  Usage: ``python benchmarks/integer_only.py [--rounds 30] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import lowbit
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, encoder_feeds, read_stories, read_sts
from lowbit.ir.sessions import make_session, to_proto

VARIANTS = ("fp32", "w8a8", "int8-integer-only", "ort-dynamic")


def build(src, calib, tmp: Path, threads: int):
    sessions = {}
    fp32 = lowbit.load_model(src)
    path = tmp / "fp32.onnx"
    path.write_bytes(to_proto(fp32).SerializeToString())
    sessions["fp32"] = make_session(str(path), threads=threads)
    for recipe in ("w8a8", "int8-integer-only"):
        res = lowbit.compile(src, recipe, calibration=calib, calibration_samples=None, progress=False)
        sessions[recipe] = make_session(res.model, threads=threads)
        if recipe == "int8-integer-only":
            from lowbit.ir.integer_check import check_integer_regions

            sessions["_report"] = res.report
            sessions["_shares"] = check_integer_regions(res.model).summary()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(tmp / "dyn.onnx"), weight_type=QuantType.QInt8)
    sessions["ort-dynamic"] = make_session(str(tmp / "dyn.onnx"), threads=threads)
    return sessions


def latency(sessions, feed, rounds: int) -> dict[str, float]:
    times = {k: [] for k in VARIANTS}
    for k in VARIANTS:
        for _ in range(3):
            sessions[k].run(None, feed)
    for _ in range(rounds):
        for k in VARIANTS:
            t = time.perf_counter()
            for _ in range(5):
                sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - t) / 5)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    d = data_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from lowbit.frontends.huggingface import packaged_minilm_path
        from lowbit.runtime.encoder import sts_spearman

        tok_dir = packaged_minilm_path()
        a, b, _ = read_sts(d / "stsbenchmark" / "sts-dev.csv")
        ta, tb, ts = read_sts(d / "stsbenchmark" / "sts-test.csv")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        calib = encoder_feeds(tok_dir, list(dict.fromkeys(a[:750] + b[:750]))[:512], names)
        (Path(tmp) / "m").mkdir()
        sess = build("minilm", calib, Path(tmp) / "m", args.threads)
        feed = {"input_ids": np.full((1, 64), 2023, np.int64), "attention_mask": np.ones((1, 64), np.int64),
                "token_type_ids": np.zeros((1, 64), np.int64)}
        feed["input_ids"][0, 0], feed["input_ids"][0, -1] = 101, 102
        lat = latency(sess, feed, args.rounds)
        for k in VARIANTS:
            sp, _ = sts_spearman(sess[k], tok_dir, ta, tb, ts)
            rows.append(("MiniLM", k, f"STS-test Spearman {sp:.2f}", lat[k], lat[k] / lat["fp32"]))
        rep_m, share_m = sess["_report"], sess["_shares"]

        from lowbit.runtime.llm import perplexity, token_stream
        from lowbit.data.tokenizers import Llama2cTokenizer

        src = d / "stories260K" / "stories260K.bin"
        tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
        stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
        calib = causal_lm_feeds(tok, stories[CALIB_STORIES], 256, "tokens")
        (Path(tmp) / "s").mkdir()
        sess = build(src, calib, Path(tmp) / "s", args.threads)
        stream = token_stream(tok, stories[EVAL_STORIES])
        feed = {"tokens": stream[None, :64].astype(np.int64)}
        lat = latency(sess, feed, args.rounds)
        for k in VARIANTS:
            ppl = perplexity(sess[k], stream)
            rows.append(("stories260K", k, f"ppl {ppl.ppl:.4f} (nll {ppl.nll:.4f})", lat[k], lat[k] / lat["fp32"]))
        rep_s, share_s = sess["_report"], sess["_shares"]
    print(f"{'model':<12} {'variant':<18} {'quality':<32} {'prefill64 ms':>12} {'ratio to fp32':>14}")
    for m, k, q, ms, r in rows:
        print(f"{m:<12} {k:<18} {q:<32} {ms:>12.3f} {r:>14.2f}")
    for name, rep, share in (("MiniLM", rep_m, share_m), ("stories260K", rep_s, share_s)):
        print(f"{name}: migrate-steps {rep.get('migrate-steps')}; dyadic {rep.get('dyadic')}")
        print(f"{name}: integer op share {share['integer_op_share']:.3f}, integer GEMM MAC share "
              f"{share['integer_mac_share']:.3f}, activation GEMMs {share['activation_gemms']}, "
              f"float ops {share['stays_float_ops']}")


if __name__ == "__main__":
    main()
