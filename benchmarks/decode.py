"""Decode ms/token at several contexts and prefill ms, TinyLlama-1.1B shape (random weights: speed only).

    python benchmarks/decode.py [--layers 22] [--threads 16,2:16/256] [--contexts 16,256,1024] [--prefill 256]
                                [--steps 8] [--genai fp32,int4] [--llama-gguf-dir DIR --llama-bin DIR
                                [--llama-py SDIST --llama-lib DIR]] [--profile] [--lock FILE] [--work DIR [--keep]]

One run measures, through the KV cache (lowbit's KVSession: cache kept in ORT between steps):

* lowbit FP32 and lowbit's 8-bit (int8 weights, dynamic int8 activations: ``MatMulInteger``) and 4-bit
  (int4 RTN g128, int8 activations: ``MatMulNBits`` accuracy level 4) graphs, each with a float cache and
  with a quantized cache (``quantize-kv``: int8, or int4 + Hadamard);
* with ``--genai fp32,int4``: onnxruntime-genai's own model builder output for the same random
  weights (a Hugging Face folder written with transformers), timed through its ``Generator``;
* with ``--llama-bin`` (its ``llama-quantize``) and ``--llama-gguf-dir``: llama.cpp through llama-cpp-python's
  ``Llama.eval`` (Q8_0 / Q4_0 GGUFs of the same shape, same threads); ``--llama-py``/``--llama-lib`` use an
  unpacked llama-cpp-python sdist and the llama.cpp libraries built from it where the package is not installed.

Decode at context c = median of ``--steps`` single-token steps with c tokens cached (contexts reached in
increasing order by extending one cache).  Ratios are to lowbit FP32 at the same context.  The growth table
puts the decode step's growth per 1,000 cached tokens next to its split (ORT's profiler, ``--profile``) into
linear layers / attention+cache nodes / the rest: only attention should grow, by about the cache bytes read.

Memory: one model is built, loaded and timed at a time, then deleted from ``--work`` (``--keep`` keeps them);
``--lock FILE`` holds a flock on FILE only while a model is built or timed, so other jobs can take turns.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = [
    ("lowbit fp32", None),
    ("lowbit fp32 +kv8", "quantize-kv{bits=8,k_mode=token}"),
    ("lowbit w8a8", "quantize{weights=8,acts=8,mode=dynamic},lower-ort"),
    ("lowbit w8a8 +kv8", "quantize-kv{bits=8,k_mode=token}", "lowbit w8a8"),
    ("lowbit w4a8", "quantize-weights{bits=4,group=128,method=rtn},lower-nbits{accuracy_level=4}"),
    ("lowbit w4a8 +kv4", "quantize-kv{bits=4,k_mode=token,group=16,hadamard=true}", "lowbit w4a8"),
]
GQA_KV = {"quantize-kv{bits=8,k_mode=token}": "quantize-kv{bits=8,k_mode=channel}",
          "quantize-kv{bits=4,k_mode=token,group=16,hadamard=true}": "quantize-kv{bits=4,k_mode=channel,hadamard=true}"}
CLOCK = time.perf_counter  # --cpu-time: time.process_time (all threads' CPU time; ORT spinning off)
_LINEAR_OPS = {"MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear"}


def gqa_variants(variants: list) -> list:
    """The rows on a GroupQueryAttention graph: labels say so, quantized caches are the op's own (static
    per-channel scales: ``quantize-kv{k_mode=channel}``, the 4-bit one behind the per-head Hadamard)."""
    out = []
    for label, pipeline, *start in variants:
        rename = lambda s: s.replace("lowbit ", "lowbit-gqa ", 1)  # noqa: E731
        out.append((rename(label), GQA_KV.get(pipeline, pipeline), *[rename(x) for x in start]))
    return out


def tinyllama(layers: int):
    from lowbit.frontends.llama2c import LlamaConfig

    return LlamaConfig(dim=2048, hidden_dim=5632, n_layers=layers, n_heads=32, n_kv_heads=4, vocab_size=32000,
                       seq_len=2048)


@contextlib.contextmanager
def bigmem(lock: str | None):
    """Hold ``--lock`` (flock, as flock(1) takes it) while one model is built or loaded: released between models."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        if time.perf_counter() - t0 > 1:
            print(f"  (waited {time.perf_counter() - t0:.0f} s for {lock})", flush=True)
        try:
            yield
        finally:
            gc.collect()
            fcntl.flock(f, fcntl.LOCK_UN)


def _session(path: Path, threads: int, no_spin: bool, profile: str | None = None, no_prepack: bool = False):
    import onnxruntime as ort

    from lowbit.ir.sessions import session_options

    so = session_options(threads=threads)
    if no_spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if no_prepack:  # weights stay in the memory-mapped data file (page cache), no packed copy
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class LowbitRunner:
    """A lowbit KV graph through ``KVSession`` (what ``lowbit generate`` runs): the cache stays in ORT values."""

    fresh_extend = False

    def __init__(self, path: Path, threads: int, no_spin: bool = False, profile: str | None = None,
                 no_prepack: bool = False):
        from lowbit.runtime import KVSession

        self.kv = KVSession(_session(path, threads, no_spin, profile, no_prepack))

    def reset(self) -> None:
        self.kv.reset()

    def extend(self, ids) -> None:
        self.kv.step(ids)

    def decode(self, token) -> None:
        self.kv.step(np.asarray([token], dtype=np.int64))


def time_runner(r, ids, contexts, prefill: int, steps: int, reps: int = 2) -> dict:
    """Prefill ms (best of ``reps``) and, per context c, the median ms of ``steps`` single-token steps taken with c
    tokens cached.  Contexts are reached in increasing order by extending one cache (a fresh one where the
    runner cannot extend after decoding)."""
    out, t = {}, []
    for _ in range(reps):
        r.reset()
        t0 = CLOCK()
        r.extend(ids[:prefill])
        t.append((CLOCK() - t0) * 1e3)
    out["prefill"] = min(t)
    r.reset()
    n = 0
    for c in sorted(contexts):
        if r.fresh_extend or c < n:
            r.reset()
            n = 0
        if c > n:
            r.extend(ids[n:c])
            n = c
        ts = []
        for _ in range(steps):
            t0 = CLOCK()
            r.decode(ids[n])
            ts.append((CLOCK() - t0) * 1e3)
            n += 1
        out[c] = statistics.median(ts)
    return out


def profile_split(path: Path, ids, contexts, threads: int, steps: int = 6) -> dict:
    """Per context: ms per decode step in linear-layer nodes / attention+cache nodes / the rest (ORT's profiler;
    each node's fastest of ``steps`` steps, so that a thread descheduled on a shared machine does not count)."""
    import bisect

    prefix = str(path.parent / "prof")
    r = LowbitRunner(path, threads, profile=prefix)
    kinds, n = [], 0
    for c in sorted(contexts):
        if c > n:
            r.extend(ids[n:c])
            kinds.append(None)
            n = c
        for _ in range(steps):
            r.decode(ids[n])
            kinds.append(c)
            n += 1
    trace_path = Path(r.kv.session.end_profiling())
    trace = json.loads(trace_path.read_text())
    trace_path.unlink()
    del r
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) != len(kinds):
        raise RuntimeError(f"profiler: {len(runs)} runs for {len(kinds)} calls")
    starts = [e["ts"] for e in runs]
    per_node: dict = {}  # (context, node) -> (kind, [ms per step])
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        c = kinds[bisect.bisect_right(starts, e["ts"]) - 1]
        if c is None:
            continue
        name, op = e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "")
        if op in _LINEAR_OPS or (op in ("MatMul", "Gemm", "FusedMatMul") and ".attn.qk" not in name
                                 and ".attn.pv" not in name):
            k = 0
        elif ".attn." in name or name.startswith("present.") or "mask." in name or "kv." in name:
            k = 1
        else:
            k = 2
        per_node.setdefault((c, name), (k, []))[1].append(e["dur"] / 1e3)
    res = {c: [0.0, 0.0, 0.0] for c in contexts}
    for (c, _), (k, ds) in per_node.items():
        res[c][k] += min(ds) * len(ds) / steps  # a node run twice per step (none here) counts twice
    return {"split": res}


def lowbit_build(label: str, pipeline, start: Path, out: Path, ids) -> Path:
    """``pipeline`` on the graph at ``start``, written to ``out``.  A ``quantize-kv`` pipeline adds only small
    tensors: its graph goes beside ``start`` and shares its weight file (no second copy on disk)."""
    import onnx
    import onnx_ir as ir

    from lowbit.data.datasets import kv_prefill_feed
    from lowbit.ir.model_io import load_onnx, save_onnx
    from lowbit.passmanager.manager import CompileContext, PassManager

    model = load_onnx(start)
    calib = [kv_prefill_feed(model, ids[None, :64])]
    model = PassManager.from_pipeline(pipeline, CompileContext(calibration=calib, show_progress=False)).run(model)
    if pipeline.startswith("quantize-kv"):
        model.ir_version = 10
        out = start.parent / f"{out.parent.name}.onnx"
        onnx.save_model(ir.serde.serialize_model(model), str(out))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(model, out, external_data=True)
    del model
    return out


def _rm(folder: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)


def _peak() -> str:
    """This process's peak RSS since the last call (then reset) and its children's peak, in GB (Linux)."""
    import resource

    try:
        hwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                   if x.startswith("VmHWM"))
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration):
        return "peak RSS n/a"
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return f"peak RSS {hwm / 2**20:.1f} GB, children {kids / 2**20:.1f} GB"


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def print_tables(rows: dict, profiles: dict, threads: int, contexts, prefill: int) -> None:
    first = next(iter(rows))
    base = rows[first]
    head = "".join(f"{'ctx ' + str(c):>17s}" for c in contexts) + f"{'prefill ' + str(prefill):>19s}"
    print(f"\n{threads} threads: decode ms/token at each context (ratio: {first} ÷ row), prefill ms")
    print(f"{'':34s}{head}")
    for label, r in rows.items():
        cells = "".join(f"{r[c]:9.2f} ({base[c] / r[c]:4.2f}x)" for c in contexts)
        print(f"{label:34s}{cells}{r['prefill']:10.1f} ({base['prefill'] / r['prefill']:4.2f}x)")
    lo, hi = min(contexts), max(contexts)
    k = 1000 / (hi - lo)
    print(f"\ngrowth of the decode step from ctx {lo} to {hi}, per 1,000 cached tokens (ms); the cache bytes a step "
          f"reads per 1,000 tokens and their time at the rate the step reads its weights at ctx {lo} (model bytes "
          "÷ ms); profiler (fastest of 6 steps per node): growth of linear layers / attention+cache nodes / rest")
    for label, r in rows.items():
        line = f"{label:34s} total {(r[hi] - r[lo]) * k:+8.2f}"
        if "cache_bytes_per_token" in r:
            cache = r["cache_bytes_per_token"] * 1000
            line += f"   cache {cache / 2**20:5.1f} MiB ≈ {cache / (r['model_bytes'] / r[lo]):6.2f} ms"
        p = profiles.get(label)
        if p:
            s = p["split"]
            line += "   profiler " + " / ".join(f"{(s[hi][i] - s[lo][i]) * k:+7.2f}" for i in range(3))
        print(line)
    if profiles:
        print("\nper step (ms): linears / attention+cache / rest, at each context (ORT profiler)")
        for label, p in profiles.items():
            print(f"{label:34s}" + "".join(f"  ctx {c}: {a:7.2f} / {b:6.2f} / {o:5.2f}"
                                           for c, (a, b, o) in sorted(p["split"].items())))
    sys.stdout.flush()


def main() -> None:
    import decode_baselines as base
    from decode_build import LazyWeights, build_streaming

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama-1.1B has 22 (fewer: same widths, faster)")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts, each timed on the same models; "
                    "T:C1/C2 times thread count T at contexts C1, C2 only (default --contexts)")
    ap.add_argument("--profile", nargs="?", const="all", default="",
                    help="also split lowbit's decode time by node kind (optionally only these row indices: 4,5)")
    ap.add_argument("--contexts", default="16,256,1024")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="prefill timed this many times (best kept)")
    ap.add_argument("--variants", default="", help="comma-separated indices into the lowbit rows (default all; none)")
    ap.add_argument("--genai", default="", help="also onnxruntime-genai's model builder at these precisions (fp32,int4)")
    ap.add_argument("--llama-bin", help="folder with llama.cpp's llama-quantize (writes the random GGUFs)")
    ap.add_argument("--llama-gguf-dir", help="folder for the random-weight GGUFs (written there once)")
    ap.add_argument("--llama-types", default="Q8_0,Q4_0")
    ap.add_argument("--llama-py", help="an unpacked llama-cpp-python sdist (where the package is not installed)")
    ap.add_argument("--llama-lib", help="llama.cpp's shared libraries built from that sdist (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--lock", help="flock this file while a model is built or timed (released between models)")
    ap.add_argument("--mmap-big", action="store_true",
                    help="lowbit models over 2 GB run with ORT's prepacking off: weights stay in the memory-mapped "
                         "data file (page cache, no anonymous copy), so they need no --lock; fp32 MatMul is slower so")
    ap.add_argument("--attention", default="plain", choices=["plain", "gqa", "both"],
                    help="lowbit's attention core: standard ops (quantized cache: per-token scales, dequantized by "
                         "plain ops) or GroupQueryAttention (its own quantized cache, static per-channel scales)")
    ap.add_argument("--keep", action="store_true", help="keep every model in --work (default: deleted once timed)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="CPU ms of all threads (process time, ORT spinning off) instead of wall ms")
    args = ap.parse_args()
    global CLOCK, VARIANTS
    if args.attention != "plain":
        VARIANTS = (VARIANTS if args.attention == "both" else []) + gqa_variants(VARIANTS)
    if args.cpu_time:
        CLOCK = time.process_time
    plan = []  # (threads, contexts)
    for part in str(args.threads).split(","):
        t, _, ctx = part.partition(":")
        plan.append((int(t), [int(c) for c in (ctx.split("/") if ctx else args.contexts.split(","))]))
    all_ctx = sorted({c for _, cs in plan for c in cs})
    n_ctx = max(all_ctx + [args.prefill]) + args.steps + 8
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = tinyllama(args.layers)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, n_ctx)
    print(f"{'CPU' if args.cpu_time else 'wall'} ms. TinyLlama-1.1B shape (dim 2048, ffn 5632, 32 heads / 4 KV heads, "
          f"vocab 32000), {args.layers} layers, random weights; threads:contexts {args.threads}; decode = median "
          f"of {args.steps} steps with the context cached; load average {_load()} at start", flush=True)
    rows = {t: {} for t, _ in plan}
    profiles = {t: {} for t, _ in plan}

    def measure(label: str, open_runner, size: int, profile_path: Path | None = None) -> None:
        for threads, contexts in plan:  # the lock only for models over 2 GB (a session holds about 1.2x the file)
            with bigmem(args.lock if size > 2 << 30 and not (args.mmap_big and "lowbit" in label) else None):
                t0 = time.perf_counter()
                r = open_runner(threads)
                load_s = time.perf_counter() - t0
                rows[threads][label] = time_runner(r, ids, contexts, args.prefill, args.steps, args.reps)
                if isinstance(r, LowbitRunner):  # the cache's bytes per token and the weights' bytes (file)
                    rows[threads][label]["cache_bytes_per_token"] = r.kv.cache_bytes() / r.kv.length
                rows[threads][label]["model_bytes"] = size
                if hasattr(r, "close"):
                    r.close()
                del r
                gc.collect()
                if profile_path is not None:
                    profiles[threads][label] = profile_split(profile_path, ids, contexts, threads)
            (work / "rows.json").write_text(json.dumps({"rows": rows, "profiles": profiles}, default=str))
            cells = ", ".join(f"{k}: {v:.1f}" for k, v in rows[threads][label].items())
            print(f"  {label}, {threads} threads: {cells} (ms; session {load_s:.0f} s, load {_load()}, {_peak()})", flush=True)

    t_start = time.perf_counter()
    chosen = ([] if args.variants == "none" else
              [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS)
    order = [v for v in chosen if "fp32" not in v[0]] + [v for v in chosen if "fp32" in v[0]]  # fp32 (locked) last
    weights = LazyWeights(cfg, seed=0)
    paths: dict[str, Path] = {}

    def base_of(label: str) -> str:  # "lowbit w4a8" -> "lowbit fp32", "lowbit-gqa w4a8" -> "lowbit-gqa fp32"
        return label.split(" ", 1)[0] + " fp32"

    def base_path(label: str) -> Path:
        """The fp32 KV graph of the row's family (written once, streamed: no lock)."""
        name = base_of(label)
        if name not in paths:
            path = work / name.replace(" ", "_") / "model.onnx"
            t0 = time.perf_counter()
            if not path.exists():
                build_streaming(cfg, weights, path, "gqa" if name.startswith("lowbit-gqa") else "plain")
            print(f"  {name} written in {time.perf_counter() - t0:.0f} s ({_peak()})", flush=True)
            paths[name] = path
        return paths[name]

    def lowbit_rows(variants) -> None:
        for i, (label, pipeline, *start) in enumerate(variants):
            src = paths[start[0]] if start else base_path(label)
            if pipeline:
                slug = label.replace(" ", "_").replace("+", "")
                path = (src.parent / f"{slug}.onnx" if pipeline.startswith("quantize-kv") else
                        work / slug / "model.onnx")
                if not path.exists():  # the w4a8 compile peaked at 3.8-4.1 GB at 22 layers: locked; the others < 3 GB
                    t0 = time.perf_counter()
                    with bigmem(args.lock if "quantize-weights" in pipeline and _size(src.parent) > 2 << 30 else None):
                        path = lowbit_build(label, pipeline, src, work / slug / "model.onnx", ids)
                    print(f"  {label} compiled ({pipeline}) in {time.perf_counter() - t0:.0f} s ({_peak()})",
                          flush=True)
                paths[label] = path
            idx = str(VARIANTS.index((label, pipeline, *start)))
            profiled = args.profile == "all" or idx in args.profile.split(",")
            size = _size(paths[label].parent)
            measure(label, lambda t, p=paths[label], big=size > 2 << 30: LowbitRunner(
                p, t, args.cpu_time, no_prepack=big and args.mmap_big), size,
                    paths[label] if args.profile and profiled else None)
            later = order[order.index((label, pipeline, *start)) + 1:]
            for name, p in list(paths.items()):  # delete what no later variant is or starts from
                if not any(lbl == name or ((s[0] if s else base_of(lbl)) == name and pl) for lbl, pl, *s in later):
                    _rm(p.parent, args.keep)
                    del paths[name]

    lowbit_rows([v for v in order if "fp32" not in v[0]])
    if args.llama_bin and args.llama_gguf_dir:  # the F16 writer holds 2.2 GB: no lock
        gdir = Path(args.llama_gguf_dir)
        before = set(gdir.glob("*.gguf")) if gdir.is_dir() else set()
        for q in args.llama_types.split(","):
            t0 = time.perf_counter()
            gguf = base.gguf_build(Path(args.llama_bin), gdir, args.layers, q)
            print(f"  GGUF {q} ready in {time.perf_counter() - t0:.0f} s ({_peak()})", flush=True)
            measure(f"llama.cpp {q} (llama-cpp-python)",
                    lambda t, g=gguf: base.LlamaCppRunner(g, t, n_ctx, args.llama_py, args.llama_lib),
                    gguf.stat().st_size)
            if not args.keep and gguf not in before:
                gguf.unlink()
        for f in set(gdir.glob("*-f16.gguf")) - before:  # the F16 source of the quantized files
            None if args.keep else f.unlink()
    lowbit_rows([v for v in order if "fp32" in v[0]])
    if args.genai:
        hf = work / "hf"
        if not (hf / "config.json").exists():
            base.write_hf_folder(cfg, weights, hf)  # per-layer shards drawn from the same lazy weights: no lock
            print(f"  HF folder written ({_peak()})", flush=True)
        for precision in sorted(args.genai.split(","), key=lambda p: p == "fp32"):  # fp32 (locked) last
            out = work / f"genai-{precision}"
            with bigmem(args.lock):  # the builder holds the HF model and its ONNX form (4-10 GB)
                t0 = time.perf_counter()
                base.genai_build(hf, out, precision, work / "genai-cache")
                print(f"  genai builder {precision} in {time.perf_counter() - t0:.0f} s ({_peak()})", flush=True)
            measure(f"ort-genai builder {precision}", lambda t, o=out: base.GenaiRunner(o, t, n_ctx), _size(out))
            _rm(out, args.keep)
        _rm(hf, args.keep)
        _rm(work / "genai-cache", args.keep)
    print(f"\nall rows in {time.perf_counter() - t_start:.0f} s; load average {_load()} at the end")
    for threads, contexts in plan:
        print_tables(_ordered(rows[threads]), profiles[threads], threads, contexts, args.prefill)


def _ordered(rows: dict) -> dict:
    """lowbit rows in VARIANTS order first (fp32 is the ratios' base), then the baselines as measured."""
    names = [v[0] for v in VARIANTS]
    return dict(sorted(rows.items(), key=lambda kv: names.index(kv[0]) if kv[0] in names else len(names)))


if __name__ == "__main__":
    main()
