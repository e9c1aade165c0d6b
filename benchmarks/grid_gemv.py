"""Compute cost of lowbit's CPU kernels per format: one 2048x512 linear kept in L2, one row, 1 thread, the
fastest of 3000 single calls (a minimum filters a shared machine's interruptions).  Integer formats
(``lowbit_cpu.c``: fp32 scale + uint8 zero point per group) next to the grid form (``lowbit_grid.c``,
``lowbit.MatMulGrid``: uint8 scale + 2-bit grid index per group).  Random codes: speed only.  Example::

    python benchmarks/grid_gemv.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

try:
    from lowbit.backends.kernels import cpu
    from lowbit.backends.kernels.grid import GridLinear, repack_grid
    from lowbit.backends.kernels.layout import repack
except ImportError:  # a bare machine: the kernel files loaded by path, as decode_kernels.py does
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_kernels import cpu, grid, layout

    GridLinear, repack_grid, repack = grid.GridLinear, grid.repack_grid, layout.repack

ROWS = [("int", 4, 128), ("int", 3, 128), ("int", 2, 32), ("int", 2, 128), ("grid", 2, 8), ("grid", 3, 16),
        ("grid", 2, 32), ("grid", 3, 32), ("grid", 3, 64), ("grid", 2, 64), ("grid", 2, 128)]


def best_call_s(lin, x: np.ndarray, calls: int) -> float:
    best, xp, run, clock = float("inf"), x.ctypes.data, lin.run_ptr, time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        run(xp)
        best = min(best, clock() - t)
    return best * 1e-9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args(argv)
    cpu.set_threads(1)
    rng = np.random.default_rng(0)
    k, n = args.k, args.n
    x = rng.standard_normal((1, k)).astype(np.float32)
    print(f"lowbit kernels: {cpu.isa()}, K={k} N={n}, 1 thread, best of {args.calls} calls")
    print("| format | bits/w | µs |\n|---|---|---|")
    for kind, bits, g in ROWS:
        ng = -(-k // g)
        codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
        if kind == "grid":
            p = repack_grid(codes, rng.integers(0, 4, (n, ng)), rng.integers(1, 256, (n, ng), dtype=np.uint8),
                            np.ones(n, np.float32), bits, g)
            lin = GridLinear(p)
        else:
            p = repack(codes, rng.uniform(0.5, 1, (n, ng)).astype(np.float32),
                       rng.integers(0, 1 << bits, (n, ng)).astype(np.uint8), bits, g)
            lin = cpu.CpuLinear(p)
        print(f"| {kind} {bits}-bit g{g} | {p.nbytes * 8 / (k * n):.2f} | {best_call_s(lin, x, args.calls) * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
