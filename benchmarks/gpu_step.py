"""lowbit's fused GPU decode step (backends/cuda/step.cu, one persistent kernel) against its floor.

    python benchmarks/gpu_step.py [--bits 4 3 2] [--context 16] [--json OUT.json]

TinyLlama-1.1B shape (dim 2048, FFN 5632, 22 layers, 32/4 heads, vocab 32000), batch 1, group 128, random
codes in the q8 layout.  One step = zero the barrier counter + one kernel launch, captured in a CUDA graph.
Floor = (weights with scales and zero points + the KV cache read) ÷ the read bandwidth measured in the
same run (benchmarks/gpu_gemv.py's kernel).

Parity first: a 2-layer small stack (dim 256, FFN 512, 4/2 heads, vocab 512, group 32) runs 6 and 40
tokens and its last logits are compared with a float64 numpy Llama decoder written from the equations,
twice: (1) with every linear's input rounded to int8 per 32 values (x ≈ d·rint(x/d), d = max|x|/127, the
q8_1 scheme of llama.cpp) and past K/V rounded to fp16, as the kernel does: max |Δ| ≤ 5e-3 · max |logit|;
(2) with no rounding at all, reported, and only checked for gross errors (≤ 0.1 · max |logit|): the int8
rounding alone moves these random-weight logits by 0.5-3.2 % of the largest (numpy against numpy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_gemv import _cuda_pkg, _graph_time, read_bandwidth  # noqa: E402


def _step_pkg():
    gemv, layout = _cuda_pkg()
    import lowbit_cuda.step as step  # noqa: F401 - registered by _cuda_pkg's package

    return gemv, layout, sys.modules["lowbit_cuda.step"]


def build(cp, layout, step, shape, bits, rng, host: bool):
    """A DecodeStep of random weights; with ``host`` also the numpy weights [N, K] for the reference."""
    s, hd = shape, 64
    dims = {"qkv": (s.dim, (s.heads + 2 * s.kv_heads) * hd), "o": (s.heads * hd, s.dim),
            "gu": (s.dim, 2 * s.hidden), "down": (s.hidden, s.dim)}
    ref = {}

    def lin(k, n, key):
        g = k // s.block
        if host:
            codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
            sc = (rng.random((n, g)) * 0.02 / np.sqrt(k / 256) + 1e-3).astype(np.float32)
            z = rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
            gi = np.arange(k) // s.block
            ref[key] = (codes - z[:, gi].astype(np.float64)) * sc[:, gi]
            if key[1] == "gu":  # rows interleaved gate, up on the device; the reference keeps [gate; up]
                perm = np.stack([np.arange(s.hidden), s.hidden + np.arange(s.hidden)], 1).reshape(-1)
                codes, sc, z = codes[perm], sc[perm], z[perm]
            w = layout.to_q8_layout(codes, sc, z, bits, s.block)
            return step.DeviceLinear(bits, cp.asarray(w.a), None if w.h is None else cp.asarray(w.h),
                                     cp.asarray(w.s), cp.asarray(w.z), s.block)
        cps = layout.CODES_PER_STEP[bits]
        a = cp.random.randint(0, 1 << 31, (n, k // cps, 4), dtype=cp.int64).astype(cp.uint32)
        h = cp.random.randint(0, 1 << 31, (n, k // 64, 2), dtype=cp.int64).astype(cp.uint32) if bits == 3 else None
        sc = (cp.random.random((n, g)) * 0.002).astype(cp.float32)
        z = cp.random.randint(0, 1 << bits, (n, g), dtype=cp.int32).astype(cp.uint8)
        return step.DeviceLinear(bits, a, h, sc, z, s.block)

    layers, norms = [], []
    for layer in range(s.layers):
        d = {name: lin(k, n, (layer, name)) for name, (k, n) in dims.items()}
        n1 = (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32)
        n2 = (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32)
        d["n1"], d["n2"] = cp.asarray(n1), cp.asarray(n2)
        norms.append((n1, n2))
        layers.append(d)
    head = lin(s.dim, s.vocab, (-1, "head"))
    nf = (1 + 0.1 * rng.standard_normal(s.dim)).astype(np.float32)
    emb = (rng.standard_normal((s.vocab, s.dim)) * 0.5).astype(np.float16)
    cp.cuda.Device().synchronize()
    st = step.DecodeStep(cp, shape, bits, layers, head, cp.asarray(nf), cp.asarray(emb))
    return st, dict(W=ref, norms=norms, nf=nf, emb=emb)


def int8_per32(v: np.ndarray) -> np.ndarray:
    """v rounded as int8 per 32 values: d·rint(v/d), d = max|v|/127 over each 32 (0 where all are 0)."""
    k = v.shape[0]
    b = np.zeros(-(-k // 32) * 32)
    b[:k] = v
    b = b.reshape(-1, 32)
    amax = np.abs(b).max(1, keepdims=True)
    d = amax / 127.0
    q = np.rint(b / np.where(amax > 0, d, 1.0))
    return (q * d).reshape(-1)[:k]


def reference_logits(shape, ref, tokens, int8_acts: bool = False) -> np.ndarray:
    """float64 numpy Llama decoder (RMSNorm, interleaved-pair RoPE θ=1e4, GQA softmax attention, SwiGLU);
    ``int8_acts``: linear inputs rounded by :func:`int8_per32`, past K/V rounded to fp16."""
    s, hd = shape, 64
    qx = int8_per32 if int8_acts else (lambda v: v)
    f16 = (lambda a: a.astype(np.float16).astype(np.float64)) if int8_acts else (lambda a: a)
    grp = s.heads // s.kv_heads
    W = ref["W"]

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x) + 1e-5) * w

    def rope(v, pos):
        v = v.reshape(-1, 32, 2)
        inv = 10000.0 ** (-2 * np.arange(32) / 64)
        c, sn = np.cos(pos * inv), np.sin(pos * inv)
        return np.stack([v[..., 0] * c - v[..., 1] * sn, v[..., 0] * sn + v[..., 1] * c], -1).reshape(-1, hd)

    kc = [[] for _ in range(s.layers)]
    vc = [[] for _ in range(s.layers)]
    for pos, tok in enumerate(tokens):
        x = ref["emb"][tok].astype(np.float64)
        for layer in range(s.layers):
            n1, n2 = ref["norms"][layer]
            qkv = W[(layer, "qkv")] @ qx(norm(x, n1))
            q = rope(qkv[: s.heads * hd], pos)
            k_new = rope(qkv[s.heads * hd:(s.heads + s.kv_heads) * hd], pos)
            v_new = qkv[(s.heads + s.kv_heads) * hd:].reshape(-1, hd)
            K = np.stack([f16(a) for a in kc[layer]] + [k_new], 1)  # the new token's k/v are not rounded
            V = np.stack([f16(a) for a in vc[layer]] + [v_new], 1)
            kc[layer].append(k_new)
            vc[layer].append(v_new)
            att = np.zeros((s.heads, hd))
            for h in range(s.heads):
                sc = K[h // grp] @ q[h] / np.sqrt(hd)
                p = np.exp(sc - sc.max())
                att[h] = (p / p.sum()) @ V[h // grp]
            x = x + W[(layer, "o")] @ qx(att.reshape(-1))
            gu = W[(layer, "gu")] @ qx(norm(x, n2))
            g, u = gu[: s.hidden], gu[s.hidden:]
            x = x + W[(layer, "down")] @ qx(g / (1 + np.exp(-g)) * u)
    return W[(-1, "head")] @ qx(norm(x, ref["nf"]))


SMALL = dict(dim=256, hidden=512, layers=2, heads=4, kv_heads=2, vocab=512, max_ctx=48, block=32)


def parity(cp, layout, step, bits, rng, ntok=6) -> tuple[float, float]:
    """(error vs the int8-rounding reference, error vs the unrounded reference), each / max |logit|."""
    shape = step.StepShape(**SMALL)
    st, ref = build(cp, layout, step, shape, bits, rng, host=True)
    tokens = [int(t) for t in rng.integers(0, shape.vocab, ntok)]
    for pos, tok in enumerate(tokens):
        st.token[...] = tok
        st.pos[...] = pos
        st.step()
    got = cp.asnumpy(st.logits).astype(np.float64)
    if st.timed_out():
        raise RuntimeError("a grid barrier timed out")
    errs = []
    for int8_acts in (True, False):
        want = reference_logits(shape, ref, tokens, int8_acts)
        errs.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return errs[0], errs[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--parity-only", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import cupy as cp

    gemv, layout, step = _step_pkg()
    rng = np.random.default_rng(0)
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"device: {dev}", flush=True)
    bw = None if args.parity_only else read_bandwidth(cp, gemv)[0]
    if bw:
        print(f"read bandwidth {bw:.0f} GB/s", flush=True)
    results = []
    for bits in args.bits:
        err = parity(cp, layout, step, bits, rng)
        long_err = parity(cp, layout, step, bits, rng, ntok=40)  # positions past one 32-lane chunk
        ok = max(err[0], long_err[0]) <= 5e-3 and max(err[1], long_err[1]) <= 0.1
        print(f"{bits}-bit fused-step parity, max |Δlogit| / max |logit| vs the int8-rounding / unrounded "
              f"reference: {err[0]:.2e} / {err[1]:.2e} (6 tokens), {long_err[0]:.2e} / {long_err[1]:.2e} "
              f"(40 tokens) ({'ok' if ok else 'FAIL'})", flush=True)
        r = dict(bits=bits, parity_6=err, parity_40=long_err, parity_ok=ok)
        if not args.parity_only:
            shape = step.StepShape(layers=args.layers)
            st, _ = build(cp, layout, step, shape, bits, rng, host=False)
            st.pos[...] = args.context
            cp.cuda.Device().synchronize()
            t = _graph_time(cp, [st.step], reps=20)
            st.flags = 0
            t_nopf = _graph_time(cp, [st.step], reps=20)
            st.flags = 1
            wb = st.weight_bytes()
            kv = 2 * shape.layers * shape.kv_heads * (args.context + 1) * 64 * 2
            floor = (wb + kv) / (bw * 1e9)
            r.update(step_us=t * 1e6, step_no_prefetch_us=t_nopf * 1e6, weight_bytes=wb, kv_bytes=kv, floor_us=floor * 1e6, pct_floor=100 * floor / t,
                     barrier_timeout=st.timed_out(), blocks=st.blocks)
            print(f"{bits}-bit fused decode step (context {args.context}, {shape.layers} layers): {t * 1e6:.1f} us "
                  f"(one CUDA graph: memset + 1 kernel, {st.blocks} blocks); floor {floor * 1e6:.1f} us "
                  f"({(wb + kv) / 1e6:.1f} MB); {r['pct_floor']:.1f} % of floor; without L2 prefetch {t_nopf * 1e6:.1f} us"
                  f"{'  BARRIER TIMEOUT' if r['barrier_timeout'] else ''}", flush=True)
            del st
            cp.get_default_memory_pool().free_all_blocks()
        results.append(r)
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, read_bw_gbps=bw, results=results), indent=1))


if __name__ == "__main__":
    main()
