"""W8A8 benchmark: FP32 vs lowbit W8A8 (smoothing on/off, static/dynamic) vs ORT's quantizers.

    python benchmarks/w8a8.py [--only stories|minilm|llama] [--eval-stories N]

* stories260K: perplexity on the held-out TinyStories stories 600–784 (lowbit.data.datasets.REPORT_STORIES);
  calibration on stories 0–99 (CALIB_STORIES), 256 tokens each — the same samples for every method.
* MiniLM (all-MiniLM-L6-v2): STS-test Spearman ×100; calibration: 128 sts-dev sentences in 8 batches.
* A realistic-shape Llama (dim 2048, 4 layers, FFN 5632, 32 heads / 8 KV heads, vocab 32000; random
  weights, speed only): latency at batch 1 with 1 token and with 64 tokens.
Latency ratios are FP32 time / method time in the same run (2 threads; > 1 means faster).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from _common import file_mb, latency_ms, ort_dynamic, ort_static, session, table, workdir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lowbit  # noqa: E402
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, encoder_feeds, read_stories, read_sts  # noqa: E402
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights  # noqa: E402

LOWBIT = ["w8a8", "w8a8-nosmooth", "w8a8-dynamic", "w8a8-dynamic-nosmooth", "w8a8-dynamic-tensor",
          "w8a8,quantize-embeddings"]


def _variants(float_model, float_path, feeds, out):
    """(name, path) for FP32, every lowbit recipe and ORT's baselines."""
    yield "fp32", float_path
    for recipe in LOWBIT:
        path = out / f"{float_path.stem}.{recipe.replace(',', '+')}.onnx"
        pipeline = ",".join(lowbit.RECIPES.get(r, r) for r in recipe.split(","))
        lowbit.compile(lowbit.load_onnx(float_path), pipeline, calibration=feeds, output=path, progress=False)
        yield f"lowbit {recipe}", path
    yield "ORT quantize_static (default ops)", ort_static(float_path, feeds, out / f"{float_path.stem}.ort_s.onnx")
    yield "ORT quantize_static (MatMul, per-channel)", ort_static(
        float_path, feeds, out / f"{float_path.stem}.ort_smm.onnx", op_types=["MatMul"], per_channel=True)
    yield "ORT quantize_dynamic", ort_dynamic(float_path, out / f"{float_path.stem}.ort_d.onnx")
    del float_model


def stories(out, n_eval):
    from lowbit.runtime.llm import perplexity, token_stream
    from lowbit.data.tokenizers import Llama2cTokenizer

    d = data_dir()
    tok = Llama2cTokenizer(d / "stories260K/tok512.bin")
    texts = read_stories(d / "tinystories/tinystories_hf_validation_head.eot.txt")
    stream = token_stream(tok, texts[EVAL_STORIES][:n_eval])
    model = lowbit.load_model(d / "stories260K/stories260K.bin")
    feeds = causal_lm_feeds(tok, texts[CALIB_STORIES], 256)
    float_path = lowbit.save_onnx(model, out / "stories260K.onnx")
    probe = {"tokens": stream[:64][None]}
    rows, base = [], None
    for name, path in _variants(model, float_path, feeds, out):
        sess = session(path)
        ppl = perplexity(sess, stream).ppl
        ms = latency_ms(sess, probe)
        base = base or (ppl, ms)
        rows.append({"method": name, "ppl": ppl, "Δppl %": 100 * (ppl / base[0] - 1), "MB": file_mb(path),
                     "ms @64 tok": ms, "speed vs fp32": base[1] / ms})
    print(f"\nstories260K — perplexity on {len(stream):,} held-out tokens (stories {EVAL_STORIES.start}–{EVAL_STORIES.start + n_eval - 1})")
    print(table(rows, ["method", "ppl", "Δppl %", "MB", "ms @64 tok", "speed vs fp32"]))


def minilm(out):
    from lowbit.runtime.encoder import sts_spearman

    d = data_dir()
    model = lowbit.load_model("minilm")
    tok = model.metadata_props["lowbit.tokenizer"]
    a, b, scores = read_sts(d / "stsbenchmark/sts-test.csv")
    da, db, _ = read_sts(d / "stsbenchmark/sts-dev.csv")
    feeds = encoder_feeds(tok, (da + db)[:128], ["input_ids", "attention_mask", "token_type_ids"])
    float_path = lowbit.save_onnx(model, out / "minilm.onnx")
    probe = encoder_feeds(tok, [" ".join(a[:8])], ["input_ids", "attention_mask", "token_type_ids"], max_length=64)[0]
    rows, base = [], None
    for name, path in _variants(model, float_path, feeds, out):
        sess = session(path)
        rho = sts_spearman(sess, tok, a, b, scores)[0]
        ms = latency_ms(sess, probe)
        base = base or (rho, ms)
        rows.append({"method": name, "STS-test ρ×100": rho, "Δ": rho - base[0], "MB": file_mb(path),
                     "ms @64 tok": ms, "speed vs fp32": base[1] / ms})
    print(f"\nall-MiniLM-L6-v2 — STS-test Spearman ({len(scores)} pairs); latency: 1 sequence of 64 tokens")
    print(table(rows, ["method", "STS-test ρ×100", "Δ", "MB", "ms @64 tok", "speed vs fp32"]))


def llama(out):
    cfg = LlamaConfig(dim=2048, hidden_dim=5632, n_layers=4, n_heads=32, n_kv_heads=8, vocab_size=32000, seq_len=256)
    model = build_llama(cfg, random_llama_weights(cfg, seed=0))
    float_path = lowbit.save_onnx(model, out / "llama2048.onnx", external_data=True)
    rng = np.random.default_rng(0)
    feeds = [{"tokens": rng.integers(0, cfg.vocab_size, (1, 64))} for _ in range(4)]
    rows, base = [], None
    methods = [("fp32", float_path)]
    for recipe in ("w8a8", "w8a8-dynamic-nosmooth", "w8a8-dynamic-tensor"):
        path = out / f"llama2048.{recipe}.onnx"
        lowbit.compile(lowbit.load_onnx(float_path), recipe, calibration=feeds, output=path, progress=False)
        methods.append((f"lowbit {recipe}", path))
    methods.append(("ORT quantize_dynamic", ort_dynamic(float_path, out / "llama2048.ort_d.onnx")))
    for name, path in methods:
        sess = session(path)
        t1 = latency_ms(sess, {"tokens": feeds[0]["tokens"][:, :1]})
        t64 = latency_ms(sess, feeds[0])
        base = base or (t1, t64)
        rows.append({"method": name, "MB": file_mb(path), "ms @1 tok": t1, "speed @1": base[0] / t1,
                     "ms @64 tok": t64, "speed @64": base[1] / t64})
        del sess
    print("\nrealistic-shape Llama (dim 2048, 4 layers, random weights: speed only), batch 1")
    print(table(rows, ["method", "MB", "ms @1 tok", "speed @1", "ms @64 tok", "speed @64"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["stories", "minilm", "llama"])
    ap.add_argument("--eval-stories", type=int, default=393)
    args = ap.parse_args()
    out = workdir()
    if args.only in (None, "stories"):
        stories(out, args.eval_stories)
    if args.only in (None, "minilm"):
        minilm(out)
    if args.only in (None, "llama"):
        llama(out)


if __name__ == "__main__":
    main()
