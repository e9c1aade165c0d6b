"""lowbit's int8-activation CUDA GEMV (backends/cuda/q8.cu, dp4a) against the measured read bandwidth.

    python benchmarks/gpu_gemv_q8.py [--k 16384 --n 28672 --block 128 --json OUT.json]

Same method as benchmarks/gpu_gemv.py (read bandwidth, parity, timing in a CUDA graph, weights rotated
so none is in L2), for the q8 kernels: each timed GEMV is TWO launches, the quantization of x to int8
(``q8_quantize_x``) and the GEMV, so the time includes quantizing the activations.

Parity: against the float64 numpy reference on the fp16 x, with the bound that int8 rounding allows:
|y − ref| ≤ Σ_blocks (max|x_block| / 254) · Σ_block |Ŵ| (half a quantization step per value) + 1e-5·Σ|x||Ŵ|.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv import _cuda_pkg, _graph_time, read_bandwidth  # noqa: E402


def _q8():
    gemv, layout = _cuda_pkg()
    import lowbit_cuda.q8  # noqa: F401

    return gemv, layout, sys.modules["lowbit_cuda.q8"]


def int8_bound(x: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """Per row: the most that int8 rounding of x per 32 values (half a step each) can move x·Ŵ."""
    k = x.shape[0]
    kp = -(-k // 32) * 32
    xp = np.zeros(kp)
    xp[:k] = x
    step = np.abs(xp).reshape(-1, 32).max(1) / 127.0
    wabs = np.zeros((wq.shape[0], kp))
    wabs[:, :k] = np.abs(wq)
    return (wabs.reshape(wq.shape[0], -1, 32).sum(-1) * (step / 2)).sum(1)


def parity(cp, layout, q8, configs, rng):
    out = []
    mod = q8.load_q8_module(configs)
    for bits in (4, 3, 2):
        for k, n, block in ((2016, 1001, 32), (4096, 777, 128)):
            g = -(-k // block)
            codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
            s = (rng.random((n, g)) * 0.02 + 0.001).astype(np.float32)
            z = rng.integers(0, 1 << bits, (n, g), dtype=np.uint8)
            x = rng.standard_normal(k).astype(np.float16).astype(np.float64)
            gi = np.arange(k) // block
            wq = (codes - z[:, gi].astype(np.float64)) * s[:, gi]
            ref = layout.reference_gemv(x, codes, s, z, block)
            tol = int8_bound(x, wq) + 1e-5 * (np.abs(wq) @ np.abs(x))
            w = layout.to_q8_layout(codes, s, z, bits, block)
            for cfg in configs:
                y = cp.asnumpy(q8.CudaGemvQ8(w, cfg, mod)(x)).astype(np.float64)
                ratio = float(np.max(np.abs(y - ref) / tol))
                out.append(dict(bits=bits, k=k, n=n, block=block, cfg=cfg.__dict__, err_over_bound=ratio,
                                ok=bool(ratio <= 1.0)))
    return out


def timing(cp, layout, q8, configs, k, n, block, read_bw, rng):
    mod = q8.load_q8_module(configs)
    out = []
    for bits in (4, 3, 2):
        cps = layout.CODES_PER_STEP[bits]
        small = layout.to_q8_layout(np.zeros((1, k), np.uint8), np.ones((1, -(-k // block)), np.float32),
                                    np.zeros((1, -(-k // block)), np.uint8), bits, block)
        nbytes = small.nbytes * n + k * 2 + n * 4
        copies = max(2, -(-(768 << 20) // nbytes))
        ops = []
        gp = small.s.shape[1]
        for _ in range(copies):
            a = cp.random.randint(0, 1 << 31, (n, k // cps, 4), dtype=cp.int64).astype(cp.uint32)
            h = cp.random.randint(0, 1 << 31, (n, k // 64, 2), dtype=cp.int64).astype(cp.uint32) if bits == 3 else None
            s = (cp.random.random((n, gp)) * 0.02).astype(cp.float32)
            z = cp.random.randint(0, 1 << bits, (n, gp), dtype=cp.int32).astype(cp.uint8)
            ops.append((a, h, s, z))
        x = cp.asarray(rng.standard_normal(k).astype(np.float16))
        y = cp.empty(n, cp.float32)
        cp.cuda.Device().synchronize()
        for cfg in configs:
            gems = [q8.CudaGemvQ8.from_device(bits, k, n, block, a, h, s, z, cfg, mod) for a, h, s, z in ops]

            def one(g):
                g.quantize(x)
                g.launch(y)
            t = _graph_time(cp, [(lambda g=g: one(g)) for g in gems] * max(1, 24 // copies))
            t_gemv = _graph_time(cp, [(lambda g=g: g.launch(y)) for g in gems] * max(1, 24 // copies))
            out.append(dict(bits=bits, k=k, n=n, block=block, cfg=cfg.__dict__, us=t * 1e6, gemv_only_us=t_gemv * 1e6,
                            bytes=nbytes,
                            gbps=nbytes / t / 1e9, pct_read_bw=100 * nbytes / t / 1e9 / read_bw))
            print(f"  q8 {bits}-bit {cfg}: {t * 1e6:8.1f} us  {nbytes / t / 1e9:7.0f} GB/s  "
                  f"{out[-1]['pct_read_bw']:5.1f} % of read bandwidth (GEMV alone {t_gemv * 1e6:.1f} us)", flush=True)
        del ops, gems
        cp.get_default_memory_pool().free_all_blocks()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import cupy as cp

    gemv, layout, q8 = _q8()
    rng = np.random.default_rng(0)
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {dev}", flush=True)
    bw, variants, _ = read_bandwidth(cp, gemv)
    print(f"read bandwidth: {bw:.0f} GB/s (best of {len(variants)} variants)", flush=True)
    par = parity(cp, layout, q8, q8.Q8_CONFIGS, rng)
    bad = [p for p in par if not p["ok"]]
    print(f"q8 parity: {len(par) - len(bad)}/{len(par)} within the int8 bound; worst err/bound "
          f"{max(p['err_over_bound'] for p in par):.3f}", flush=True)
    for p in bad[:10]:
        print("  FAIL", p)
    res = timing(cp, layout, q8, q8.Q8_CONFIGS, args.k, args.n, args.block, bw, rng)
    bars = {4: 75.0, 3: 65.0, 2: 65.0}
    for bits in (4, 3, 2):
        r = min((r for r in res if r["bits"] == bits), key=lambda r: r["us"])
        print(f"best q8 {bits}-bit: {r['cfg']} {r['us']:.1f} us = {r['pct_read_bw']:.1f} % of read bandwidth "
              f"(bar {bars[bits]:.0f} %: {'met' if r['pct_read_bw'] >= bars[bits] else 'NOT met'})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, read_bw_gbps=bw, parity=par, timing=res), indent=1))


if __name__ == "__main__":
    main()
