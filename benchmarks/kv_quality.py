"""KV-cache quantization quality: perplexity and bytes per cached token, FP32 cache vs int8/int4 caches.

    python benchmarks/kv_quality.py [--model GGUF_OR_BIN] [--calib 0:100] [--eval 600:785] [--rows 0,1,3] [--group 32] [--seq-len 512]
                                    [--attention gqa]

The model is loaded once in its KV-cache form (weights float, as the frontend gives them); every row
applies only ``quantize-kv`` with the options shown, so weights and activations are otherwise equal.
Calibration (static K ranges) and evaluation use disjoint TinyStories slices of
``tinystories_hf_validation_head.eot.txt``.  Perplexity is scored on whole windows of the KV graph
(prefill from an empty cache): each token's K/V is quantized once, when it enters the cache, so this
equals token-by-token cached decoding (tests/test_quantize_kv.py checks that identity).
``--attention gqa`` builds the graph with com.microsoft ``GroupQueryAttention`` (GGUF models), whose own quantized
cache ``quantize-kv{k_mode=channel}`` then uses (static per-channel scales: rows 0, 2, 7, 8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = [  # {g}: --group (channels per dynamic scale group)
    ("fp32 cache", None),
    ("int8, K per-token", "quantize-kv{bits=8,k_mode=token}"),
    ("int8, K per-channel static", "quantize-kv{bits=8,k_mode=channel}"),
    ("int4, K per-token", "quantize-kv{bits=4,k_mode=token}"),
    ("int4, K per-token + Hadamard", "quantize-kv{bits=4,k_mode=token,hadamard=true}"),
    ("int4, K/V groups of {g}", "quantize-kv{bits=4,k_mode=token,group={g}}"),
    ("int4, K/V groups of {g} + Hadamard", "quantize-kv{bits=4,k_mode=token,group={g},hadamard=true}"),
    ("int4, K per-channel static", "quantize-kv{bits=4,k_mode=channel}"),
    ("int4, K per-channel static + Hadamard", "quantize-kv{bits=4,k_mode=channel,hadamard=true}"),
    ("int4, K/V groups of {g} + Hadamard + sink 1", "quantize-kv{bits=4,k_mode=token,group={g},hadamard=true,sink=1}"),
    ("int4, K per-token + Hadamard + sink 1", "quantize-kv{bits=4,k_mode=token,hadamard=true,sink=1}"),
    ("int4, K per-token + sink 1", "quantize-kv{bits=4,k_mode=token,sink=1}"),
    ("int8, K per-token + sink 1", "quantize-kv{bits=8,k_mode=token,sink=1}"),
]


def _slice(text: str) -> slice:
    a, _, b = text.partition(":")
    return slice(int(a), int(b))


def _load_kv(path: str, attention: str, load_model):
    if attention == "plain":
        return load_model(path, kv_cache=True)
    if not path.endswith(".gguf"):
        raise SystemExit(f"error: --attention {attention} is implemented here for GGUF models only")
    from lowbit.frontends.decoder import build_decoder
    from lowbit.frontends.gguf_file import read_gguf

    spec, weights, _ = read_gguf(Path(path))
    meta = {"lowbit.source": Path(path).name, "lowbit.tokenizer": str(Path(path).resolve())}
    return build_decoder(spec, weights, kv_cache=True, attention_impl=attention, metadata=meta)


def main() -> None:
    from lowbit.data.datasets import data_dir, kv_prefill_feed, read_stories
    from lowbit.frontends import load_model
    from lowbit.frontends.text_tokenizers import load_tokenizer
    from lowbit.ir.model_io import load_onnx, save_onnx
    from lowbit.ir.sessions import make_session
    from lowbit.passmanager.manager import CompileContext, PassManager
    from lowbit.runtime.llm import perplexity, token_stream

    d = data_dir()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(d / "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--calib", default="0:100")
    ap.add_argument("--eval", default="600:785")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default all)")
    ap.add_argument("--group", type=int, default=32, help="channels per scale group in the grouped rows")
    ap.add_argument("--work", default="/tmp/lowbit-kv-quality")
    ap.add_argument("--attention", default="plain", choices=["plain", "gqa"],
                    help="attention core of the KV graph (gqa: GroupQueryAttention; GGUF models only)")
    args = ap.parse_args()
    text = d / "tinystories/tinystories_hf_validation_head.eot.txt"
    stories = read_stories(text)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.attention == "plain" else f".{args.attention}"
    cached = work / (Path(args.model).stem + f".kv{suffix}.onnx")
    t0 = time.perf_counter()
    if not cached.exists():
        save_onnx(_load_kv(args.model, args.attention, load_model), cached)
    model0 = load_onnx(cached)
    tok = load_tokenizer(model0.metadata_props.get("lowbit.tokenizer") or args.model)
    print(f"model {args.model} (KV form) loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    calib = [kv_prefill_feed(model0, __import__("numpy").array([tok.encode(s)[:256]]))
             for s in stories[_slice(args.calib)]]
    stream = token_stream(tok, stories[_slice(args.eval)])
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    rows = [(label.replace("{g}", str(args.group)), p and p.replace("{g}", str(args.group))) for label, p in rows]
    print(f"calibration stories {args.calib}, evaluation stories {args.eval}: {stream.size} tokens, "
          f"windows of {args.seq_len}", flush=True)
    print(f"{'cache':42s} {'ppl':>8s} {'Δ ppl':>8s} {'bytes/token':>12s}", flush=True)
    base = None
    for label, pipeline in rows:
        model = load_onnx(cached)
        ctx = CompileContext(calibration=calib, show_progress=False)
        if pipeline:
            model = PassManager.from_pipeline(pipeline, ctx).run(model)
            nbytes = ctx.report["quantize-kv"]["bytes_per_token"]
        else:
            meta = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
            nbytes = sum(int(v.shape[1]) * int(v.shape[3]) * 4 for v in meta)
        t = time.perf_counter()
        ppl = perplexity(make_session(model), stream, seq_len=args.seq_len, batch=1).ppl
        base = ppl if base is None and pipeline is None else base
        delta = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
        print(f"{label:42s} {ppl:8.4f} {delta:>8s} {nbytes:12d}   ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
