"""Scale: compile a realistic-shape Llama with more than 2 GB of float weights, measuring peak RSS and time.

    python benchmarks/scale.py                      # 12 layers of TinyLlama-1.1B shape: 2.6 GB float
    python benchmarks/scale.py --layers 22 --recipes w8a8-dynamic-nosmooth

Random weights (speed and memory only, never quality).  The model is built without ever holding
its weights in memory: the graph comes from lowbit's llama2.c frontend with placeholder weights,
and every weight is generated tensor by tensor straight into an external data file.  Each
recipe then compiles in a fresh process that reports its own peak RSS (``getrusage``), so the
build never counts.  The target is peak RSS ≤ 1.5× the float weight bytes.  Calibration (static
recipes) uses a few short random token sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = {"dim": 2048, "hidden": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000, "seq_len": 2048}


def _cfg(args):
    from lowbit.frontends.llama2c import LlamaConfig

    return LlamaConfig(dim=args.dim, hidden_dim=args.hidden, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, vocab_size=args.vocab, seq_len=args.seq_len, tied=False)


def _real_shapes(cfg) -> dict[str, tuple[tuple[int, ...], float]]:
    """Initializer name → (shape, init std; 0 means ones) of build_llama's weights, linears as [in, out]."""
    d, h, kv, v = cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.vocab_size
    out = {"embed.weight": ((v, d), d ** -0.5), "final_norm.weight": ((d,), 0.0), "lm_head.weight": ((d, v), d ** -0.5)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        out.update({f"{p}.attn_norm.weight": ((d,), 0.0), f"{p}.ffn_norm.weight": ((d,), 0.0),
                    f"{p}.attn.q_proj.weight": ((d, d), d ** -0.5), f"{p}.attn.k_proj.weight": ((d, kv), d ** -0.5),
                    f"{p}.attn.v_proj.weight": ((d, kv), d ** -0.5), f"{p}.attn.o_proj.weight": ((d, d), d ** -0.5),
                    f"{p}.mlp.gate_proj.weight": ((d, h), d ** -0.5), f"{p}.mlp.up_proj.weight": ((d, h), d ** -0.5),
                    f"{p}.mlp.down_proj.weight": ((h, d), h ** -0.5)})
    return out


def build(args) -> dict:
    """Write ``llama.onnx`` + ``llama.onnx.data`` into the work dir, one tensor at a time."""
    import onnx_ir as ir

    from lowbit.frontends.llama2c import build_llama

    cfg = _cfg(args)
    L = cfg.n_layers
    tiny = {"embed": np.zeros((1, 1), np.float32), "head": np.zeros((1, 1), np.float32),
            "final_norm": np.zeros(1, np.float32), "attn_norm": np.zeros((L, 1), np.float32),
            "ffn_norm": np.zeros((L, 1), np.float32)}
    tiny.update({k: np.zeros((L, 1, 1), np.float32) for k in ("q", "k", "v", "o", "w1", "w2", "w3")})
    model = build_llama(cfg, tiny, {"lowbit.source": "scale-benchmark (random weights)"})
    shapes = _real_shapes(cfg)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "llama.onnx.data"
    rng = np.random.default_rng(args.seed)
    offset = 0
    with open(data, "wb") as f:
        for name, value in model.graph.initializers.items():
            if name not in shapes:
                continue
            shape, std = shapes[name]
            arr = np.ones(shape, np.float32) if std == 0 else rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            f.write(arr.tobytes())
            value.const_value = ir.ExternalTensor(data.name, offset, arr.nbytes, ir.DataType.FLOAT,
                                                  shape=ir.Shape(shape), name=name, base_dir=work)
            value.shape = ir.Shape(shape)
            offset += arr.nbytes
            del arr
    missing = set(shapes) - set(model.graph.initializers)
    assert not missing, f"build_llama names changed: {sorted(missing)[:3]}"
    model.ir_version = 10
    ir.save(model, work / "llama.onnx")
    return {"float_bytes": offset, "path": str(work / "llama.onnx")}


def compile_one(args) -> dict:
    """Compile in this (fresh) process; report its own peak RSS and the phases' times."""
    import lowbit

    feeds = None
    if "dynamic-nosmooth" not in args.recipe:
        rng = np.random.default_rng(1)
        feeds = [{"tokens": rng.integers(3, args.vocab, (1, args.calib_len), dtype=np.int64)}
                 for _ in range(args.calib_samples)]
    start = time.perf_counter()
    res = lowbit.compile(args.model, args.recipe, calibration=feeds, output=args.output, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = Path(args.output)
    files = sum(p.stat().st_size for p in out.parent.iterdir() if p.name.startswith(out.name))
    passes = {p["pass"].split("{")[0]: p["seconds"] for p in res.report["passes"]}
    del res
    # the artifact runs: one short forward pass in ORT (after the peak was read)
    from lowbit.ir.sessions import make_session

    logits = make_session(out, threads=os.cpu_count()).run(None, {"tokens": np.arange(3, 19)[None].astype(np.int64)})[0]
    return {"recipe": args.recipe, "peak_rss": peak, "seconds": seconds, "passes": passes, "output_bytes": files,
            "logits_finite": bool(np.isfinite(logits).all()), "logits_shape": list(logits.shape)}


def trace_phases(args) -> dict:
    """The same compile, run pass by pass, sampling RSS (every 20 ms) to attribute the peak to a phase."""
    import threading

    from lowbit.api.driver import check_weights
    from lowbit.frontends import load_model
    from lowbit.ir.model_io import save_onnx
    from lowbit.passmanager.manager import CompileContext, Instrument, PassManager
    from lowbit.passmanager.recipes import resolve_recipe

    phase, peaks, done = ["load"], {}, threading.Event()
    page = os.sysconf("SC_PAGE_SIZE")

    def sample():
        while not done.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
            time.sleep(0.02)

    class Mark(Instrument):
        def before_pass(self, p, model):
            phase[0] = p.name

    threading.Thread(target=sample, daemon=True).start()
    model = load_model(args.model)
    phase[0] = "check-weights"
    check_weights(model)
    rng = np.random.default_rng(1)
    feeds = [{"tokens": rng.integers(3, args.vocab, (1, args.calib_len), dtype=np.int64)}
             for _ in range(args.calib_samples)]
    ctx = CompileContext(calibration=feeds, probes=feeds[:2], show_progress=False)
    model = PassManager.from_pipeline(resolve_recipe(args.recipe), ctx, [Mark()]).run(model)
    phase[0] = "save"
    save_onnx(model, args.output)
    phase[0] = "end"
    time.sleep(0.1)
    done.set()
    return {"recipe": args.recipe, "phase_peak_rss": peaks}


def _child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {argv[:2]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all", choices=["all", "build", "compile", "trace"])
    ap.add_argument("--layers", type=int, default=12)
    for k, v in SHAPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--recipes", default="w8a8-dynamic-nosmooth,w8a8,w4a16")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lowbit-scale"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=64)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step == "build":
        print(json.dumps(build(args)))
        return 0
    if args.step == "compile":
        print(json.dumps(compile_one(args)))
        return 0
    if args.step == "trace":  # python benchmarks/scale.py trace --model M --recipe R --output O
        print(json.dumps(trace_phases(args)))
        return 0
    shape_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE] + [f"--layers={args.layers}"]
    t = time.perf_counter()
    stamp = Path(args.workdir) / "build.json"
    key = " ".join(shape_args + [f"--seed={args.seed}"])
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        built = json.loads(stamp.read_text())  # the same model is already on disk
    else:
        built = _child(["build", *shape_args, f"--workdir={args.workdir}", f"--seed={args.seed}"])
        stamp.write_text(json.dumps({**built, "key": key}))
    fb = built["float_bytes"]
    print(f"model: {args.layers} layers, dim {args.dim}, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}: {fb / 1e9:.2f} GB float32 weights (built in {time.perf_counter() - t:.0f} s)")
    print(f"{'recipe':<24} {'peak RSS':>9} {'× float':>8} {'seconds':>8} {'output':>9}  passes (s)")
    worst = 0.0
    for recipe in args.recipes.split(","):
        out = Path(args.workdir) / f"llama.{recipe}.onnx"
        r = _child(["compile", *shape_args, f"--recipe={recipe}", f"--model={built['path']}", f"--output={out}",
                    f"--calib-samples={args.calib_samples}", f"--calib-len={args.calib_len}"])
        ratio = r["peak_rss"] / fb
        worst = max(worst, ratio)
        passes = ", ".join(f"{k} {v:.1f}" for k, v in r["passes"].items())
        print(f"{recipe:<24} {r['peak_rss'] / 1e9:>7.2f}GB {ratio:>8.2f} {r['seconds']:>8.1f} "
              f"{r['output_bytes'] / 1e9:>7.2f}GB  {passes}; runs: {r['logits_finite']}")
    print(f"worst peak RSS / float bytes: {worst:.2f} (target <= 1.5)")
    return 0 if worst <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
