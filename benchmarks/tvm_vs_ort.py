"""CPU latency of TVM vs ONNX Runtime on the same compiled graphs (realistic-shape Llama, random weights).

    python benchmarks/tvm_vs_ort.py [--dim 2048 --hidden 5632 --layers 4 --vocab 8192] [--forms nbits4,dynamic]
                                    [--seqs 1,64] [--tuning-db DIR] [--threads N]

Each row: one graph form and one token count (batch 1), the median of --reps runs after warm-up,
TVM and ORT measured in the same process, alternately, ratio = TVM / ORT (below 1: TVM faster).
Random weights: for speed only, never for quality claims.

On a machine shared with other busy processes, timings mean little; the lent GPU machine's idle
CPU cores (runtime-only TVM there, no compiler) serve instead:

    here:  python benchmarks/tvm_vs_ort.py --build-remote DIR --mcpu skylake-avx512
    there: PYTHONPATH=DIR/pkg:/tmp/site TVM_USE_RUNTIME_LIB=1 python3 DIR/tvm_vs_ort.py --run-remote DIR --threads 8

``--build-remote`` compiles the libraries here; ``--run-remote`` rebuilds the same ONNX models from
the same seeds there (lowbit's own code, carried in DIR/pkg), computes the parameters with
``tvm_params`` (no TVM needed), checks them against the shapes recorded here and the outputs
against ORT, then times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _time_pair(f, g, reps: int) -> tuple[float, float]:
    """Medians (ms) of f and g, called alternately so that load from other processes hits both."""
    f(), g(), f(), g()
    tf, tg = [], []
    for _ in range(reps):
        for fn, acc in ((f, tf), (g, tg)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(tf) * 1e3, statistics.median(tg) * 1e3


def _models(args):
    """(form, ir.Model) for each requested form, built deterministically from the seeds."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx_ir as ir
    import tvm_graphs as tg

    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
    from lowbit.ir.sessions import to_proto

    cfg = LlamaConfig(dim=args.dim, hidden_dim=args.hidden, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, vocab_size=args.vocab,
                      seq_len=max(int(s) for s in args.seqs.split(",")))
    float_proto = to_proto(build_llama(cfg, random_llama_weights(cfg)))
    for form in args.forms.split(","):
        if form.startswith("nbits"):
            proto = tg.matmulnbits(float_proto, bits=int(form[5:] or 4), block=args.block)
        elif form == "float":
            proto = float_proto
        else:
            proto = tg.quantize_all_linears(float_proto, form, block=args.block)
        yield form, cfg, ir.serde.deserialize_model(proto)


def _row(form, seq, ort_ms, tvm_ms, diff, extra=""):
    print(f"{form:<10} {seq:>6} {ort_ms:>9.2f} {tvm_ms:>9.2f} {tvm_ms / ort_ms:>8.2f} {diff:>12.1e}{extra}", flush=True)


HEADER = f"{'form':<10} {'tokens':>6} {'ORT ms':>9} {'TVM ms':>9} {'TVM/ORT':>8} {'max rel diff':>12}"


def run_local(args) -> None:
    import tempfile

    from lowbit.backends.tvm_lower import lower_tvm
    from lowbit.ir.sessions import make_session
    from lowbit.runtime.tvm_runner import TvmSession

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"# load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)")
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    for form, cfg, model in _models(args):
        if form == args.forms.split(",")[0]:
            print(f"# Llama dim={cfg.dim} hidden={cfg.hidden_dim} layers={cfg.n_layers} heads={cfg.n_heads}/"
                  f"{cfg.n_kv_heads} vocab={cfg.vocab_size}, batch 1, {args.threads} threads, median of {args.reps}")
            print(HEADER)
        ort = make_session(model, threads=args.threads)
        for seq in (int(s) for s in args.seqs.split(",")):
            feeds = {"tokens": np.random.default_rng(seq).integers(0, cfg.vocab_size, (1, seq)).astype(np.int64)}
            t0 = time.perf_counter()
            art = lower_tvm(model, "llvm", work, f"{form}_{seq}", shape_dict={"tokens": [1, seq]},
                            tuning_db=args.tuning_db)
            compile_s = time.perf_counter() - t0
            sess = TvmSession(art.lib)
            ref, got = ort.run(None, feeds)[0], sess.run(None, feeds)[0]
            diff = float(np.abs(got - ref).max() / np.abs(ref).max())
            ort_ms, tvm_ms = _time_pair(lambda: ort.run(None, feeds), lambda: sess.run(None, feeds), args.reps)
            _row(form, seq, ort_ms, tvm_ms, diff, f"   (TVM compile {compile_s:.0f} s)")


def build_remote(args) -> None:
    import tvm

    from lowbit.backends.tvm_lower import compile_relax, import_relax

    out = Path(args.build_remote)
    out.mkdir(parents=True, exist_ok=True)
    target = tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu})
    for form, _cfg, model in _models(args):
        for seq in (int(s) for s in args.seqs.split(",")):
            mod, arrays, meta = import_relax(model, target, {"tokens": [1, seq]})
            compile_relax(mod, target).export_library(str(out / f"{form}_{seq}.so"))
            meta["param_spec"] = [[list(a.shape), a.dtype.name, float(np.float64(a.astype(np.float64).sum()))]
                                  for a in arrays]
            (out / f"{form}_{seq}.json").write_text(json.dumps(meta))
    pkg = out / "pkg" / "lowbit"
    shutil.rmtree(out / "pkg", ignore_errors=True)
    shutil.copytree(ROOT / "compiler", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("backends", "runtime", "passes"):
        shutil.copytree(ROOT / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "tvm_graphs.py", out / "tvm_graphs.py")
    shutil.copy(__file__, out / "tvm_vs_ort.py")
    (out / "args.json").write_text(json.dumps(vars(args)))


def run_remote(args) -> None:
    import ctypes  # noqa: F401

    import tvm
    import tvm.runtime.vm  # noqa: F401

    from lowbit.backends.tvm_lower import tvm_params
    from lowbit.ir.sessions import make_session

    d = Path(args.run_remote)
    built = json.loads((d / "args.json").read_text())
    for key in ("dim", "hidden", "layers", "heads", "kv_heads", "vocab", "forms", "seqs", "block"):
        setattr(args, key, built[key])
    dev = tvm.cpu(0)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# {cpu}, {os.cpu_count()} cores; {args.threads} threads for both; TVM built for mcpu={built['mcpu']}")
    print(HEADER)
    for form, _cfg, model in _models(args):
        ort = make_session(model, threads=args.threads)
        for seq in (int(s) for s in args.seqs.split(",")):
            meta = json.loads((d / f"{form}_{seq}.json").read_text())
            arrays = tvm_params(model, "tiled", {"tokens": [1, seq]})
            spec = [[list(a.shape), a.dtype.name, float(np.float64(a.astype(np.float64).sum()))] for a in arrays]
            same = len(spec) == len(meta["param_spec"]) and all(
                s[:2] == m[:2] and np.isclose(s[2], m[2], rtol=1e-6, atol=1e-3) for s, m in zip(spec, meta["param_spec"]))
            if not same:
                raise SystemExit(f"{form}_{seq}: parameters rebuilt here differ from the build machine's")
            vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(d / f"{form}_{seq}.so")), dev)
            params = [tvm.runtime.tensor(a, dev) for a in arrays]
            feeds = {"tokens": np.random.default_rng(seq).integers(0, args.vocab, (1, seq)).astype(np.int64)}
            tok = tvm.runtime.tensor(feeds["tokens"], dev)
            run_tvm = lambda: vm["main"](tok, *params).numpy()  # noqa: E731
            ref, got = ort.run(None, feeds)[0], run_tvm()
            diff = float(np.abs(got - ref).max() / np.abs(ref).max())
            ort_ms, tvm_ms = _time_pair(lambda: ort.run(None, feeds), run_tvm, args.reps)
            _row(form, seq, ort_ms, tvm_ms, diff)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--forms", default="nbits4,dynamic")
    p.add_argument("--seqs", default="1,64")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tuning-db", default=None)
    p.add_argument("--build-remote", default=None, help="compile for another machine's CPU into this folder")
    p.add_argument("--mcpu", default="skylake-avx512", help="with --build-remote: the LLVM cpu to compile for")
    p.add_argument("--run-remote", default=None, help="run a --build-remote folder here (runtime-only TVM)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.build_remote:
        build_remote(args)
    elif args.run_remote:
        run_remote(args)
    else:
        run_local(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
