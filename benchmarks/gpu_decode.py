"""One decode step of a whole low-bit Llama stack on the GPU, in one CUDA graph, against its floor.

    python benchmarks/gpu_decode.py [--bits 4 3 2] [--context 16] [--json OUT.json]

TinyLlama-1.1B shape (dim 2048, FFN 5632, 22 layers, 32/4 heads, vocab 32000), batch 1, random
codes in lowbit's GPU layout (backends/cuda/layout.py), group 128; every linear (QKV fused, O,
gate+up fused, down, LM head) is ``gemv.cu`` at its bit width, O and down add straight into the
fp32 residual; RMSNorm, RoPE + attention over the fp16 KV cache, SiLU·up are ``decode.cu``.
Per layer: 8 launches, none of them a tiny elementwise op on its own; the whole step (178 launches)
is captured once in a CUDA graph and replayed.  The floor is the bytes one step must read (all
weights with their scales and zero points, the KV cache) ÷ the read bandwidth measured in the same
run (benchmarks/gpu_gemv.py's kernel).  Each linear's launch configuration is the fastest of
``gemv.DEFAULT_CONFIGS`` for its shape, timed alone first.

Parity: a 2-layer small stack (dim 256) runs 6 steps through the same kernels and its last logits are
compared with a float64 numpy decoder written from the Llama equations (activations rounded to fp16
where the GPU stores fp16): max |Δ| ≤ 2e-2 · max |logit|.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv import _cuda_pkg, _graph_time, read_bandwidth  # noqa: E402


_GEMV, _LAYOUT = _cuda_pkg()  # backends/cuda by path (the device has no lowbit install)
from lowbit_cuda.step import StepShape as Shape  # noqa: E402  the decode step's own shape


class Stack:
    """The device buffers and launches of one decode step."""

    def __init__(self, cp, gemv, layout, shape: Shape, bits: int, rng, host=False, configs=None):
        self.cp, self.gemv, self.shape, self.bits = cp, gemv, shape, bits
        s = shape
        hd = 64
        self.mod = gemv.load_module(gemv.DEFAULT_CONFIGS)
        self.small = gemv.build_module('#include "decode.cu"\n')
        self.k = {n: self.small.get_function(n) for n in ("rmsnorm_f16", "silu_mul_f16", "embed_f32", "rope_attention")}
        dims = {"qkv": (s.dim, (s.heads + 2 * s.kv_heads) * hd), "o": (s.heads * hd, s.dim),
                "gu": (s.dim, 2 * s.hidden), "down": (s.hidden, s.dim)}
        self.host = {}  # (layer, name) -> (codes, scales, zeros) when host=True (parity)
        self.lin = []
        configs = configs or {}
        for layer in range(s.layers):
            d = {}
            for name, (k, n) in dims.items():
                d[name] = self._linear(layout, k, n, rng, host, (layer, name), configs.get(name))
            d["n1"] = cp.asarray((1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32))
            d["n2"] = cp.asarray((1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32))
            self.lin.append(d)
        self.head = self._linear(layout, s.dim, s.vocab, rng, host, (-1, "head"), configs.get("head"))
        self.nf = cp.asarray((1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32))
        self.emb_h = (rng.standard_normal((s.vocab, s.dim)) * 0.5).astype(np.float16)
        self.emb = cp.asarray(self.emb_h)
        self.kc = [cp.zeros((s.kv_heads, s.max_ctx, hd), cp.float16) for _ in range(s.layers)]
        self.vc = [cp.zeros((s.kv_heads, s.max_ctx, hd), cp.float16) for _ in range(s.layers)]
        self.x = cp.zeros(s.dim, cp.float32)
        self.xn = cp.zeros(max(s.dim, s.hidden), cp.float16)
        self.qkv = cp.zeros(dims["qkv"][1], cp.float32)
        self.att = cp.zeros(s.heads * hd, cp.float16)
        self.gu = cp.zeros(2 * s.hidden, cp.float32)
        self.act = cp.zeros(s.hidden, cp.float16)
        self.logits = cp.zeros(s.vocab, cp.float32)
        self.token = cp.zeros(1, cp.int32)
        self.pos = cp.zeros(1, cp.int32)

    def _linear(self, layout, k, n, rng, host, key, cfg):
        cp, bits, block = self.cp, self.bits, self.shape.block
        g = k // block
        if host:
            codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
            sc = (rng.random((n, g)) * 0.02 / np.sqrt(k / 256) + 1e-3).astype(np.float32)
            z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
            self.host[key] = (codes, sc, z)
            return self.gemv.CudaGemv(layout.to_gpu_layout(codes, sc, z, bits, block),
                                      cfg or self.gemv.GemvConfig(), self.mod)
        cps = layout.CODES_PER_STEP[bits]
        a = cp.random.randint(0, 1 << 31, (n, k // cps, 4), dtype=cp.int64).astype(cp.uint32)
        h = cp.random.randint(0, 1 << 31, (n, k // 64, 2), dtype=cp.int64).astype(cp.uint32) if bits == 3 else None
        sc = (cp.random.random((n, g)) * 0.002).astype(cp.float32)
        z = cp.random.randint(0, 1 << bits, (n, g), dtype=cp.int32).astype(cp.uint8)
        return self.gemv.CudaGemv.from_device(bits, k, n, block, a, h, sc, z, cfg or self.gemv.GemvConfig(), self.mod)

    def weight_bytes(self) -> int:
        lins = [d[n] for d in self.lin for n in ("qkv", "o", "gu", "down")] + [self.head]
        return int(sum(g.a.nbytes + (g.h.nbytes if g.bits == 3 else 0) + g.s.nbytes + g.z.nbytes for g in lins))

    def step(self) -> None:
        """One token: embed → 22 × (norm, QKV, RoPE+attention, O+residual, norm, gate/up, SiLU·up, down+residual)
        → norm → LM head."""
        cp, s, k = self.cp, self.shape, self.k
        i32, f32 = cp.int32, cp.float32
        k["embed_f32"](((s.dim + 255) // 256,), (256,), (self.emb, self.token, self.x, i32(s.dim)))
        for d, kc, vc in zip(self.lin, self.kc, self.vc):
            k["rmsnorm_f16"]((1,), (256,), (self.x, d["n1"], self.xn, i32(s.dim), f32(1e-5)))
            d["qkv"].launch(self.xn, self.qkv)
            k["rope_attention"]((s.heads,), (32,), (self.qkv, kc, vc, self.att, self.pos, i32(s.heads),
                                                     i32(s.kv_heads), i32(s.max_ctx), f32(10000.0)))
            d["o"].launch(self.att, self.x, accumulate=True)
            k["rmsnorm_f16"]((1,), (256,), (self.x, d["n2"], self.xn, i32(s.dim), f32(1e-5)))
            d["gu"].launch(self.xn, self.gu)
            k["silu_mul_f16"](((s.hidden + 255) // 256,), (256,), (self.gu, self.act, i32(s.hidden)))
            d["down"].launch(self.act, self.x, accumulate=True)
        k["rmsnorm_f16"]((1,), (256,), (self.x, self.nf, self.xn, i32(s.dim), f32(1e-5)))
        self.head.launch(self.xn, self.logits)


def _reference_logits(stack: Stack, tokens) -> np.ndarray:
    """float64 numpy decoder over the same codes (fp16 rounding where the GPU stores fp16)."""
    s = stack.shape
    hd, grp = 64, s.heads // s.kv_heads
    f16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731

    def w(key):
        codes, sc, z = stack.host[key]
        g = np.arange(codes.shape[1]) // s.block
        return (codes - z[:, g].astype(np.float64)) * sc[:, g]  # [N, K]

    def norm(x, wt):
        return f16(x / np.sqrt(np.mean(x * x) + 1e-5) * wt)

    def rope(v, pos):
        v = v.reshape(-1, 32, 2)
        inv = 10000.0 ** (-2 * np.arange(32) / 64)
        c, sn = np.cos(pos * inv), np.sin(pos * inv)
        return np.stack([v[..., 0] * c - v[..., 1] * sn, v[..., 0] * sn + v[..., 1] * c], -1).reshape(-1, 64)

    W = {key: w(key) for key in stack.host}
    n1 = [cp_asnumpy(d["n1"]) for d in stack.lin]
    n2 = [cp_asnumpy(d["n2"]) for d in stack.lin]
    kcache = [[] for _ in range(s.layers)]
    vcache = [[] for _ in range(s.layers)]
    for pos, tok in enumerate(tokens):
        x = stack.emb_h[tok].astype(np.float64)
        for layer in range(s.layers):
            qkv = W[(layer, "qkv")] @ norm(x, n1[layer])
            q = rope(qkv[: s.heads * hd], pos)
            kk = rope(qkv[s.heads * hd:(s.heads + s.kv_heads) * hd], pos)
            vv = qkv[(s.heads + s.kv_heads) * hd:].reshape(-1, 64)
            kcache[layer].append(kk)
            vcache[layer].append(vv)
            K, V = np.stack(kcache[layer], 1), np.stack(vcache[layer], 1)  # [kv, t, 64]
            att = np.zeros((s.heads, hd))
            for h in range(s.heads):
                sc = K[h // grp] @ q[h] / 8.0
                p = np.exp(sc - sc.max())
                att[h] = (p / p.sum()) @ V[h // grp]
            x = x + W[(layer, "o")] @ f16(att.reshape(-1))
            gu = W[(layer, "gu")] @ norm(x, n2[layer])
            g, u = gu[: s.hidden], gu[s.hidden:]
            x = x + W[(layer, "down")] @ f16(g / (1 + np.exp(-g)) * u)
    return W[(-1, "head")] @ norm(x, cp_asnumpy(stack.nf))


def cp_asnumpy(a):
    import cupy as cp

    return cp.asnumpy(a).astype(np.float64)


def parity(cp, gemv, layout, bits, rng) -> float:
    small = Shape(dim=256, hidden=512, layers=2, heads=4, kv_heads=2, vocab=512, max_ctx=16, block=32)
    st = Stack(cp, gemv, layout, small, bits, rng, host=True)
    tokens = [int(t) for t in rng.integers(0, small.vocab, 6)]
    for pos, tok in enumerate(tokens):
        st.token[...] = tok
        st.pos[...] = pos
        st.step()
    got = cp.asnumpy(st.logits).astype(np.float64)
    ref = _reference_logits(st, tokens)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def best_configs(cp, gemv, layout, shape: Shape, bits, rng) -> dict:
    """The fastest of DEFAULT_CONFIGS for each linear's shape (each timed alone in a CUDA graph)."""
    s = shape
    dims = {"qkv": (s.dim, (s.heads + 2 * s.kv_heads) * 64), "o": (s.heads * 64, s.dim), "gu": (s.dim, 2 * s.hidden),
            "down": (s.hidden, s.dim), "head": (s.dim, s.vocab)}
    st = Stack.__new__(Stack)
    st.cp, st.gemv, st.shape, st.bits, st.mod = cp, gemv, shape, bits, gemv.load_module(gemv.DEFAULT_CONFIGS)
    out = {}
    for name, (k, n) in dims.items():
        copies = [st._linear(layout, k, n, rng, False, None, None) for _ in range(8)]
        x = cp.zeros(k, cp.float16)
        y = cp.zeros(n, cp.float32)
        acc = name in ("o", "down")
        times = {}
        for cfg in gemv.DEFAULT_CONFIGS:
            gs = [gemv.CudaGemv.from_device(bits, k, n, s.block, g.a, g.h if bits == 3 else None, g.s, g.z, cfg, st.mod)
                  for g in copies]
            times[cfg] = _graph_time(cp, [(lambda g=g: g.launch(x, y, accumulate=acc)) for g in gs] * 4)
        out[name] = min(times, key=times.get)
        print(f"  {bits}-bit {name} K={k} N={n}: best {out[name]} {times[out[name]] * 1e6:.1f} us", flush=True)
    return out


def check_configs(cp, gemv, layout, bits, rng) -> list:
    """One plain-launched step of a 1-layer full-width stack for every (linear, configuration), synchronised
    after each: which launch configuration of which linear faults (run under compute-sanitizer to see where)."""
    bad = []
    names = ("qkv", "o", "gu", "down", "head")
    for cfg in gemv.DEFAULT_CONFIGS:
        for name in names:
            configs = {n: (cfg if n == name else gemv.GemvConfig()) for n in names}
            st = Stack(cp, gemv, layout, Shape(layers=1), bits, rng, configs=configs)
            st.pos[...] = 16
            try:
                st.step()
                cp.cuda.Device().synchronize()
            except Exception as exc:  # noqa: BLE001 - a fault ends the context; report it and stop
                bad.append((name, cfg, repr(exc)[:200]))
                print(f"  {bits}-bit {name} {cfg}: FAULT {exc!r}", flush=True)
                return bad
            del st
        print(f"  {bits}-bit {cfg}: every linear ran", flush=True)
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--check-configs", action="store_true", help="only run check_configs (for compute-sanitizer)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import cupy as cp

    gemv, layout = _GEMV, _LAYOUT
    rng = np.random.default_rng(0)
    if args.check_configs:
        for bits in args.bits:
            check_configs(cp, gemv, layout, bits, rng)
        return
    bw, _, _ = read_bandwidth(cp, gemv)
    print(f"read bandwidth {bw:.0f} GB/s", flush=True)
    results = []
    shape = Shape()
    for bits in args.bits:
        try:
            err = parity(cp, gemv, layout, bits, rng)
        except Exception:  # noqa: BLE001 - report and still time the stack
            import traceback

            traceback.print_exc()
            err = float("nan")
        print(f"{bits}-bit small-stack parity: max |Δlogit| / max |logit| = {err:.2e} "
              f"({'ok' if err <= 2e-2 else 'FAIL'})", flush=True)
        cfgs = best_configs(cp, gemv, layout, shape, bits, rng)
        st = Stack(cp, gemv, layout, shape, bits, rng, configs=cfgs)
        st.pos[...] = args.context
        plain = _graph_time(cp, [st.step], reps=20)
        wb = st.weight_bytes()
        kv = 2 * shape.layers * shape.kv_heads * (args.context + 1) * 64 * 2
        floor = (wb + kv) / (bw * 1e9)
        a, b = cp.cuda.Event(), cp.cuda.Event()
        st.step()
        a.record()
        for _ in range(20):
            st.step()
        b.record()
        b.synchronize()
        nograph = cp.cuda.get_elapsed_time(a, b) / 1e3 / 20
        r = dict(bits=bits, step_us=plain * 1e6, no_graph_us=nograph * 1e6, weight_bytes=wb, kv_bytes=kv,
                 floor_us=floor * 1e6, pct_floor=100 * floor / plain, parity=err,
                 configs={k: v.__dict__ for k, v in cfgs.items()})
        results.append(r)
        print(f"{bits}-bit decode step (context {args.context}): {plain * 1e6:.1f} us in a CUDA graph "
              f"({nograph * 1e6:.1f} us launched one by one); floor {floor * 1e6:.1f} us "
              f"({(wb + kv) / 1e6:.1f} MB); {r['pct_floor']:.1f} % of floor", flush=True)
        del st
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        args.json.write_text(json.dumps(dict(read_bw_gbps=bw, results=results), indent=1))


if __name__ == "__main__":
    main()
