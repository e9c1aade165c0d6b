"""CPU latency of TVM vs ONNX Runtime on the same compiled graphs (realistic-shape Llama, random weights).

    python benchmarks/tvm_vs_ort.py [--dim 2048 --hidden 5632 --layers 4 --vocab 8192] [--forms nbits4,float]
                                    [--seqs 1,64] [--tuning-db DIR] [--threads N]

Each row: one graph form and one token count (batch 1), the median of --reps runs after warm-up,
TVM and ORT measured in the same process, alternately, ratio = TVM / ORT (below 1: TVM faster).  Random
weights: for speed only, never for quality claims.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--forms", default="nbits4,float")
    p.add_argument("--seqs", default="1,64")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tuning-db", default=None)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import onnx_ir as ir
    import tvm_graphs as tg

    from lowbit.backends.tvm_lower import lower_tvm
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
    from lowbit.runtime.session import make_session, to_proto
    from lowbit.runtime.tvm_runner import TvmSession

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    cfg = LlamaConfig(dim=args.dim, hidden_dim=args.hidden, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, vocab_size=args.vocab, seq_len=max(int(s) for s in args.seqs.split(",")))
    float_proto = to_proto(build_llama(cfg, random_llama_weights(cfg)))
    print(f"# load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)")
    print(f"# Llama dim={cfg.dim} hidden={cfg.hidden_dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
          f"vocab={cfg.vocab_size}, batch 1, {args.threads} threads, median of {args.reps}")
    print(f"{'form':<10} {'tokens':>6} {'ORT ms':>9} {'TVM ms':>9} {'TVM/ORT':>8} {'max rel diff':>12}")
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    for form in args.forms.split(","):
        if form.startswith("nbits"):
            proto = tg.matmulnbits(float_proto, bits=int(form[5:] or 4), block=args.block)
        elif form == "float":
            proto = float_proto
        else:
            proto = tg.quantize_all_linears(float_proto, form, block=args.block)
        model = ir.serde.deserialize_model(proto)
        ort = make_session(model, threads=args.threads)
        for seq in (int(s) for s in args.seqs.split(",")):
            tok = np.random.default_rng(seq).integers(0, cfg.vocab_size, (1, seq)).astype(np.int64)
            t0 = time.perf_counter()
            art = lower_tvm(model, "llvm", work, f"{form}_{seq}", shape_dict={"tokens": [1, seq]},
                            tuning_db=args.tuning_db)
            compile_s = time.perf_counter() - t0
            sess = TvmSession(art.lib)
            feeds = {"tokens": tok}
            ref = ort.run(None, feeds)[0]
            got = sess.run(None, feeds)[0]
            diff = float(np.abs(got - ref).max() / np.abs(ref).max())
            ort_ms, tvm_ms = _time_pair(lambda: ort.run(None, feeds), lambda: sess.run(None, feeds), args.reps)
            print(f"{form:<10} {seq:>6} {ort_ms:>9.2f} {tvm_ms:>9.2f} {tvm_ms / ort_ms:>8.2f} {diff:>12.1e}"
                  f"   (TVM compile {compile_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
