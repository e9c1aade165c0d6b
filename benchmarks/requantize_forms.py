"""Standard-op ORT forms of ``lowbit.Requantize`` (shared shift, per-channel b): time and exactness.

A  the current lowering: Cast→int64, Mul b, Add (offset + 2^62), Cast→uint64, BitShift c, Clip, Cast (7 ops)
B  int64 floor division: Cast→int64, Mul b, Add (offset + 2^62), Div 2^c, Clip, Cast (6 ops)
C  int32 with a short multiplier b' (|acc|·b' + offset < 2^31 from the accumulator bound): Mul, Add, Div, Clip,
   Cast (5 ops) — exact for Requantize(acc; b', c'), whose multiplier has fewer significant bits.
D  as C with Cast→uint32 + BitShift instead of Div (6 ops).
Each form is checked bit-exact against ``requantize_reference`` (with its own b, c) on the timed inputs.
Usage: ``python benchmarks/requantize_forms.py [--threads 2] [--rows 64]``.  Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node
from lowbit.ir.sessions import make_session
from lowbit.ops.integer_ops import dyadic, emit_requantize, requantize_reference


def _graph(n: int, build) -> ir.Model:
    acc = ir.Value(name="acc", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["m", n]))
    g = ir.Graph([acc], [], nodes=[], opset_imports={"": 21}, name="g")
    g.outputs.append(build(g, acc))
    return ir.Model(g, ir_version=10)


def _ops(g, name):
    def node(op, ins, suffix, **attrs):
        return make_node(g, op, ins, origin="bench", name=f"{name}.{suffix}", attributes=attrs).outputs[0]

    def const(suffix, arr):
        return add_initializer(g, f"{name}.{suffix}", np.asarray(arr))

    return node, const


def form_b(b, c, zp):
    def build(g, acc):
        node, const = _ops(g, "b")
        base = np.int64(1) << np.int64(62 - c)
        k = (np.int64(1) << np.int64(62)) + (np.int64(1) << np.int64(c - 1)) + np.int64(zp) * (np.int64(1) << np.int64(c))
        t = node("Add", [node("Mul", [node("Cast", [acc], "i64", to=ir.DataType.INT64), const("b", b)], "mul"),
                         const("k", np.int64(k))], "add")
        q = node("Div", [t, const("d", np.int64(1) << np.int64(c))], "div")
        y = node("Cast", [node("Clip", [q, const("lo", base), const("hi", base + 255)], "clip")], "u8",
                 to=ir.DataType.UINT8)
        y.dtype = ir.DataType.UINT8
        return y
    return build


def form_c(b, c, zp):
    def build(g, acc):
        node, const = _ops(g, "c")
        base = np.int32(1) << np.int32(30 - c)
        k = (1 << 30) + (1 << (c - 1)) + int(zp) * (1 << c)
        t = node("Add", [node("Mul", [acc, const("b", b.astype(np.int32))], "mul"), const("k", np.int32(k))], "add")
        q = node("Div", [t, const("d", np.int32(1 << c))], "div")
        y = node("Cast", [node("Clip", [q, const("lo", np.int32(base)), const("hi", np.int32(base + 255))], "clip")],
                 "u8", to=ir.DataType.UINT8)
        y.dtype = ir.DataType.UINT8
        return y
    return build


def form_d(b, c, zp):
    def build(g, acc):
        node, const = _ops(g, "d")
        base = np.uint32(1) << np.uint32(30 - c)
        k = (1 << 30) + (1 << (c - 1)) + int(zp) * (1 << c)
        t = node("Add", [node("Mul", [acc, const("b", b.astype(np.int32))], "mul"), const("k", np.int32(k))], "add")
        u = node("BitShift", [node("Cast", [t], "u32", to=ir.DataType.UINT32), const("c", np.uint32(c))], "shift",
                 direction=ir.AttrString("direction", "RIGHT"))
        y = node("Cast", [node("Clip", [u, const("lo", np.uint32(base)), const("hi", np.uint32(base + 255))], "clip")],
                 "u8", to=ir.DataType.UINT8)
        y.dtype = ir.DataType.UINT8
        return y
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for n in (384, 1536):
        bound = 2 ** 21  # a typical K=384 accumulator bound: 255·Σ|W| for int8 weights
        acc = rng.integers(-bound // 8, bound // 8, (args.rows, n)).astype(np.int32)
        m = rng.uniform(2e-5, 8e-5, n)  # real scale to the output step
        zp = np.uint8(128)
        b, c, _ = dyadic(m, 30, shared_shift=True)
        bits = 29 - int(np.ceil(np.log2(bound)))  # |acc|·b' < 2^29, so the +2^30 offset keeps int32 positive
        b2, c2, err2 = dyadic(m, bits, shared_shift=True)
        c0 = int(np.unique(c)[0])
        forms = {"A current (int64, BitShift)": (lambda g, a: emit_requantize(g, a, b, c, np.asarray(zp), origin="bench",
                                                                               name="a"), b, c),
                 "B int64 Div": (form_b(b, c0, zp), b, c),
                 f"C int32 Div (b' {bits} bits, scale err {err2:.1e})": (form_c(b2, int(np.unique(c2)[0]), zp), b2, c2),
                 "D int32 BitShift (same b')": (form_d(b2, int(np.unique(c2)[0]), zp), b2, c2)}
        for name, (build, bb, cc) in forms.items():
            sess = make_session(_graph(n, build), threads=args.threads)
            got = sess.run(None, {"acc": acc})[0]
            exact = np.array_equal(got, requantize_reference(acc, bb, cc, np.asarray(zp)))
            for _ in range(10):
                sess.run(None, {"acc": acc})
            t = time.perf_counter()
            for _ in range(args.rounds):
                sess.run(None, {"acc": acc})
            us = (time.perf_counter() - t) / args.rounds * 1e6
            print(f"[{args.rows}x{n}] {name:<48} {us:9.1f} us  exact={exact}")


if __name__ == "__main__":
    main()
