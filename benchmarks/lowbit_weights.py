"""Low-bit weights: stories260K perplexity and file size per recipe; latency on a realistic-shape Llama.

Quality: perplexity of stories260K on the held-out TinyStories slice ``EVAL_STORIES`` (calibration
on ``CALIB_STORIES``), through ONNX Runtime, for FP32, ORT's own ``MatMulNBitsQuantizer`` (RTN,
asymmetric, its default) and lowbit's RTN/GPTQ with and without rotation, W4A8 and W4A4.  Lowbit
rows use asymmetric weights too, so that at equal block size only the algorithm differs.

Latency: a random Llama of realistic shape (dim 2048, FFN 5632, 4 layers, 32 heads / 4 KV heads,
vocab 32000: 238 M parameters), batch 1, one token and a 32-token prompt, every format timed in
interleaved rounds in one run; the ratio is FP32 time / format time (> 1 is faster than float).

    python benchmarks/lowbit_weights.py            # both parts
    python benchmarks/lowbit_weights.py --quality  # or --latency
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, read_stories
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights, read_llama2c
from lowbit.ir.model_io import save_onnx
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.runtime.fastpath import fast_session
from lowbit.runtime.llm import perplexity, token_stream
from lowbit.ir.sessions import make_session, to_proto
from lowbit.data.tokenizers import Llama2cTokenizer

ROT = "fold-norms,rotate,"
GPTQ = "calibrate{{hessian=true}},quantize-weights{{bits={b},group={g},method=gptq,symmetric=false{x}}}"
RTN = "quantize-weights{{bits={b},group={g},method=rtn,symmetric=false{x}}}"


def quality_rows() -> list[tuple[str, str, object]]:
    rows = [("fp32", "fp32", None)]
    for bits, block in ((4, 32), (4, 128), (2, 32), (8, 128)):
        rows.append((f"ORT MatMulNBitsQuantizer RTN w{bits} b{block}", "ort", (bits, block)))
    for bits, group in ((8, 128), (4, 128), (4, 32), (3, 128), (3, 32), (2, 32)):
        x = ",clip_search=true" if bits <= 3 else ""
        for label, tmpl in (("RTN", RTN), ("GPTQ", GPTQ)):
            q = tmpl.format(b=bits, g=group, x=x)
            rows.append((f"lowbit {label} w{bits} g{group}", "lowbit", q + ",lower-nbits"))
            rows.append((f"lowbit {label} w{bits} g{group} +rotate", "lowbit", ROT + q + ",lower-nbits"))
    g4 = GPTQ.format(b=4, g=128, x="")
    rows += [("lowbit w4a8 (GPTQ g128, int8 acts)", "lowbit", f"{g4},lower-nbits{{accuracy_level=4}}"),
             ("lowbit w4a8 +smooth", "lowbit", f"calibrate,smooth{{alpha=0.5}},{g4},lower-nbits{{accuracy_level=4}}"),
             ("lowbit w4a8 +rotate", "lowbit", f"{ROT}{g4},lower-nbits{{accuracy_level=4}}"),
             ("lowbit w4a8 +rotate+smooth (recipe w4a8)", "lowbit", "recipe:w4a8"),
             ("lowbit w4a4 (int4 per-token acts)", "lowbit",
              f"{g4},quantize-acts{{bits=4}},lower-nbits{{accuracy_level=4}}"),
             ("lowbit w4a4 +rotate (recipe w4a4)", "lowbit", "recipe:w4a4")]
    return rows


def ort_quantize(proto, bits: int, block: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=False)
    q.process()
    return q.model.model


def run_pipeline(model, pipeline: str, feeds):
    from lowbit.passmanager.recipes import RECIPES

    if pipeline.startswith("recipe:"):
        pipeline = RECIPES[pipeline.split(":", 1)[1]]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    return PassManager.from_pipeline(pipeline, ctx).run(model)


def bits_per_weight(path: Path) -> str:
    """On-disk bits per weight of the lowbit.MatMul3Bit layers in ``path``: codes alone and with scales."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    weights = code_bytes = meta_bytes = 0
    for node in m.graph.node:
        if node.op_type == "MatMul3Bit":
            b, s, z = (inits[n] for n in node.input[1:4])
            k = next(int(p.value) for p in node.metadata_props if p.key == "lowbit.k")
            weights += b.dims[0] * k
            code_bytes += len(b.raw_data)
            meta_bytes += len(s.raw_data) + len(z.raw_data)
    return (f"3-bit layers on disk: {8 * code_bytes / weights:.3f} bits/weight of codes, "
            f"{8 * (code_bytes + meta_bytes) / weights:.3f} with scales and zero points ({weights} weights)")


def quality(args) -> None:
    d = data_dir()
    cfg, weights = read_llama2c(d / "stories260K" / "stories260K.bin")
    tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    feeds = causal_lm_feeds(tok, stories[CALIB_STORIES])
    evals = stories[EVAL_STORIES][: args.stories or None]
    stream = token_stream(tok, evals)
    print(f"stories260K, eval stories {EVAL_STORIES.start}..{EVAL_STORIES.start + len(evals)} "
          f"({stream.size} tokens), calibration stories {CALIB_STORIES.start}..{CALIB_STORIES.stop}")
    base = None
    fmt = "{:<44} {:>8} {:>8} {:>10} {:>7}"
    print(fmt.format("model", "ppl", "Δppl", "file KB", "size"))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kind, spec) in enumerate(quality_rows()):
            if args.only and args.only not in label:
                continue
            path = Path(tmp) / f"m{i}.onnx"
            model = build_llama(cfg, weights)
            if kind == "ort":
                onnx.save(ort_quantize(to_proto(model), *spec), str(path))
            elif kind == "lowbit":
                save_onnx(run_pipeline(model, spec, feeds), path)
            else:
                save_onnx(model, path)
            sess = make_session(str(path))
            ppl = perplexity(sess, stream).ppl
            size = path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob(f"m{i}.onnx.data"))
            if base is None:
                base = (ppl, size)
            print(fmt.format(label, f"{ppl:.4f}", f"{ppl - base[0]:+.4f}", f"{size / 1024:.1f}",
                             f"{size / base[1]:.3f}"), flush=True)
            if "w3" in label and "RTN" in label and "rotate" not in label and "g128" in label:
                fast = perplexity(fast_session(str(path)), stream).ppl
                print(fmt.format("  same file, 3-bit fast path (4-bit repack)", f"{fast:.4f}",
                                 f"{fast - base[0]:+.4f}", "", ""), flush=True)
                print("  " + bits_per_weight(path), flush=True)


def latency(args) -> None:
    cfg = LlamaConfig(256, 688, 2, 8, 4, 512, 128) if args.tiny else LlamaConfig(2048, 5632, 4, 32, 4, 32000, 512)
    weights = random_llama_weights(cfg, seed=0)
    fmts = [("fp32", None, None),
            ("w8 g128 acc4 (MatMulNBits)", RTN.format(b=8, g=128, x="") + ",lower-nbits{accuracy_level=4}", None),
            ("w4 g128 acc0 (MatMulNBits)", RTN.format(b=4, g=128, x="") + ",lower-nbits", None),
            ("w4a8 g128 acc4 (MatMulNBits)", RTN.format(b=4, g=128, x="") + ",lower-nbits{accuracy_level=4}", None),
            ("w4a8 +rotate (online Hadamard)", ROT + RTN.format(b=4, g=128, x="") + ",lower-nbits{accuracy_level=4}",
             None),
            ("w4a4 +rotate (int4 acts, acc4)", ROT + RTN.format(b=4, g=128, x="") +
             ",quantize-acts{bits=4},lower-nbits{accuracy_level=4}", None),
            ("w2 g32 acc4 (MatMulNBits)", RTN.format(b=2, g=32, x="") + ",lower-nbits{accuracy_level=4}", None),
            ("w3 g128, function body (plain ORT)", RTN.format(b=3, g=128, x="") + ",lower-nbits", "plain"),
            ("w3 g128, fast path (4-bit repack)", RTN.format(b=3, g=128, x="") + ",lower-nbits", "fast")]
    print(f"\nrealistic-shape random Llama {cfg.dim}/{cfg.hidden_dim}/{cfg.n_layers} layers/vocab {cfg.vocab_size}, "
          f"batch 1, {args.threads or 'all'} threads; each format timed against FP32 in {args.rounds} interleaved "
          "rounds (medians), one format in memory at a time")
    fmt = "{:<38} {:>9} {:>10} {:>9} {:>10} {:>9}"
    print(fmt.format("format", "file MB", "1 tok ms", "speedup", "32 tok ms", "speedup"), flush=True)
    feeds = {seq: {"tokens": np.arange(seq, dtype=np.int64)[None] % cfg.vocab_size} for seq in (1, 32)}
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for i, (label, pipe, how) in enumerate(fmts):
            path = Path(tmp) / f"l{i}.onnx"
            model = build_llama(cfg, weights)
            if pipe:
                model = run_pipeline(model, pipe, None)
            save_onnx(model, path)
            del model
            size = sum(p.stat().st_size for p in Path(tmp).glob(f"l{i}.onnx*"))
            sess = fast_session(str(path), threads=args.threads) if how == "fast" else \
                make_session(str(path), threads=args.threads)
            if base is None:
                base = sess
            res = {}
            for seq, feed in feeds.items():
                pair = [[], []]
                for s_ in (base, sess):
                    s_.run(None, feed)  # warm up
                for _ in range(args.rounds):
                    for j, s_ in enumerate((base, sess)):
                        t = time.perf_counter()
                        s_.run(None, feed)
                        pair[j].append(time.perf_counter() - t)
                res[seq] = [statistics.median(t) * 1e3 for t in pair]
            print(fmt.format(label, f"{size / 2**20:.1f}", f"{res[1][1]:.2f}", f"{res[1][0] / res[1][1]:.2f}x",
                             f"{res[32][1]:.2f}", f"{res[32][0] / res[32][1]:.2f}x"), flush=True)
            if sess is not base:
                del sess
            for f in Path(tmp).glob(f"l{i}.onnx*"):
                if i:
                    f.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--stories", type=int, default=0, help="evaluate on the first N held-out stories (0: all)")
    ap.add_argument("--only", default="", help="quality rows whose label contains this")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="latency on a tiny Llama (smoke test of the script)")
    args = ap.parse_args()
    both = not (args.quality or args.latency)
    if args.quality or both:
        quality(args)
    if args.latency or both:
        latency(args)


if __name__ == "__main__":
    main()
