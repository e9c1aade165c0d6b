"""Hand-planted bugs of the classes issue 16 lists, run against the fast tests that cover each module.

Where ``mutation.py`` plants blind one-token mutants, these are the bugs a person writes: off-by-one
group boundaries, the sign of a zero point, a transposed or wrong-axis scale, ``-8..7`` vs ``-7..7``,
half-even vs half-away rounding, a dropped bias, a dropped lazy GPTQ update, α and 1 − α swapped,
the order of a requantize's multiply and shift.  Each entry replaces one exact snippet of a module
(the snippet must occur once) in a staged copy of the package and runs ``COVER[module]`` plus the
entry's extra test files; the bug is caught when they fail.

    nice -n 19 python benchmarks/planted.py [--only NAME ...] [--jobs 2] [--list]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import queue
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation import COVER, ROOT, run_tests, stage  # noqa: E402


@dataclass(frozen=True)
class Bug:
    name: str
    module: str
    old: str
    new: str
    tests: tuple[str, ...] = ()  # extra test files besides COVER[module]


RTN, GPTQ, INT8, OPS = "compiler/quant/rtn.py", "compiler/quant/gptq.py", "compiler/quant/int8.py", \
    "compiler/ops/integer_ops.py"
FRONT = "compiler/frontends/decoder_attention.py"
BUGS = [
    # group boundaries
    Bug("rtn-group-rows-shifted", GPTQ, "rows = np.arange(w.shape[0]) // blocks(w.shape[0], group)[0]",
        "rows = (np.arange(w.shape[0]) + 1) // blocks(w.shape[0], group)[0]"),
    Bug("dequantize-group-rows-shifted", GPTQ, "rows = np.arange(q.shape[0]) // blocks(q.shape[0], group)[0]",
        "rows = np.minimum(np.arange(q.shape[0]) + 1, q.shape[0] - 1) // blocks(q.shape[0], group)[0]"),
    Bug("gptq-new-group-off-by-one", GPTQ, "if static is None and col % g == 0:",
        "if static is None and (col + 1) % g == 0 or (static is None and col == 0):"),
    Bug("grouped-pads-at-the-front", RTN, "wp[:k] = w", "wp[nb * g - k:] = w"),
    # zero points: sign, range
    Bug("rtn-zero-point-sign", RTN, "zp = np.clip(np.round(-lo / np.where(scale == 0, one, scale)), 0, qmax)",
        "zp = np.clip(np.round(lo / np.where(scale == 0, one, scale)), 0, qmax)"),
    Bug("static-act-zero-point-sign", INT8, "zp = int(np.clip(np.round(-lo / step), 0, 255))",
        "zp = int(np.clip(np.round(lo / step), 0, 255))"),
    Bug("static-act-step-256", INT8, "step = (hi - lo) / 255.0", "step = (hi - lo) / 256.0"),
    Bug("dyadic-zero-point-sign", "passes/dyadic.py",
        "k = -(np.broadcast_to(site.a_zp.astype(np.int64), (site.wq.shape[0],)) @ site.wq.astype(np.int64))",
        "k = np.broadcast_to(site.a_zp.astype(np.int64), (site.wq.shape[0],)) @ site.wq.astype(np.int64)"),
    # clipping ranges
    Bug("symmetric-range-7", RTN, "scale = v / -half", "scale = v / -(half - 1)"),
    Bug("encode-clip-one-short", RTN, "return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 1)",
        "return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 2)"),
    Bug("int8-weight-range-126", INT8, "scale = np.where(amax > 0, amax / 127.0, 1.0)",
        "scale = np.where(amax > 0, amax / 126.0, 1.0)"),
    Bug("act-clip-low-end-symmetric", "passes/quantize_acts.py", 'c("lo", np.array(-qmax - 1, np.float32))',
        'c("lo", np.array(-qmax, np.float32))'),
    Bug("act-qmax-full-range", "passes/quantize_acts.py", "qmax = float(2 ** (self.options.bits - 1) - 1)",
        "qmax = float(2 ** (self.options.bits - 1))"),
    Bug("kv-codes-clip-one-short", "passes/quantize_kv.py", 'codes = op("Clip", [codes, f32(0.0), f32(qmax)], "clip")',
        'codes = op("Clip", [codes, f32(0.0), f32(qmax - 1)], "clip")'),
    # rounding mode
    Bug("rtn-round-half-away", RTN, "return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 1)",
        "return np.clip(np.sign(w / scale) * np.floor(np.abs(w / scale) + 0.5) + zp, 0, (1 << bits) - 1)"),
    Bug("int8-weight-round-half-up", INT8, "wq = np.clip(np.round(w / scale), -127, 127)",
        "wq = np.clip(np.floor(w / scale + 0.5), -127, 127)"),
    Bug("requantize-truncates", OPS, "p = acc.astype(np.int64) * b + (np.int64(1) << (c - 1))",
        "p = acc.astype(np.int64) * b"),
    # axis / layout
    Bug("int8-weight-per-tensor", INT8, "amax = np.abs(w).max(axis=0).astype(np.float32)",
        "amax = np.full(w.shape[1], np.abs(w).max(), np.float32)"),
    Bug("w8a8-weight-dq-axis-0", "passes/quantize.py",
        'name=f"{lin.name}.weight_dq", attributes={"axis": 1}, before=lin.node)',
        'name=f"{lin.name}.weight_dq", attributes={"axis": 0}, before=lin.node)'),
    Bug("wq-per-channel-dq-axis-0", "passes/quantize_weights.py", 'attrs = {"axis": 1}', 'attrs = {"axis": 0}'),
    Bug("embedding-scale-per-column", "passes/quantize_embeddings.py",
        "amax = np.abs(table).max(axis=1).astype(np.float32)",
        "amax = np.resize(np.abs(table).max(axis=0), table.shape[0]).astype(np.float32)"),
    Bug("migrate-weight-dq-axis-0", "passes/migrate_steps.py",
        'name=f"{lin.name}.weight_dq", attributes={"axis": 1}, before=lin.node)',
        'name=f"{lin.name}.weight_dq", attributes={"axis": 0}, before=lin.node)'),
    Bug("fold-norms-gamma-on-columns", "passes/fold_norms.py", "set_input_const(graph, lin.node, 1, g[:, None] * w)",
        "set_input_const(graph, lin.node, 1, w * np.resize(g, w.shape[1])[None, :])"),
    Bug("integer-lut-codes-off-by-one", "passes/integer_lut.py", "codes = np.arange(lo, hi + 1, dtype=np.float64)",
        "codes = np.arange(lo + 1, hi + 2, dtype=np.float64)"),
    Bug("awq-grid-misses-the-top", "passes/awq.py", "for i in range(1, o.grid + 1):", "for i in range(1, o.grid):"),
    Bug("stats-per-row-not-channel", "compiler/quant/stats.py",
        "lo = np.where(finite, x2, np.inf).min(axis=0)",
        "lo = np.resize(np.where(finite, x2, np.inf).min(axis=1), x2.shape[1])"),
    Bug("nbits-codes-high-nibble-first", "backends/nbits.py", "shifts = (bits * np.arange(per)).astype(np.uint8)",
        "shifts = (bits * np.arange(per)[::-1]).astype(np.uint8)", ("test_lower_nbits_levels.py", "test_lowbit_ops.py",
                                                                   "test_quantize_weights.py")),
    # bias paths
    Bug("dyadic-bias-ignores-weight-scale", "passes/dyadic.py",
        "k = k + np.round(site.bias.astype(np.float64) / real).astype(np.int64)",
        "k = k + np.round(site.bias.astype(np.float64) / sigma).astype(np.int64)"),
    Bug("rotate-v-bias-unrotated", "passes/rotate.py",
        "b = const_array(v.bias).astype(np.float64).reshape(-1, hd) @ r2",
        "b = const_array(v.bias).astype(np.float64).reshape(-1, hd)"),
    Bug("smooth-prev-bias-unscaled", "compiler/quant/channel_scales.py",
        "set_input_const(graph, prev.bias_node, idx, prev.bias.const_value.numpy() / s.astype(np.float32))",
        "pass"),
    # method, not only equivalence
    Bug("migrate-prev-bias-unscaled", "passes/migrate_steps.py",
        "set_input_const(graph, prev.bias_node, idx, prev.bias.const_value.numpy() / sp.astype(np.float32))", "pass"),
    Bug("smooth-alpha-swapped", "passes/smooth.py", "s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)",
        "s[ok] = x[ok] ** (1.0 - alpha) / w[ok] ** alpha"),
    Bug("gptq-no-lazy-update", GPTQ, "wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]", "pass"),
    Bug("gptq-error-not-scaled", GPTQ, "e = (wcol - deq) / hinv1[i, i]", "e = wcol - deq"),
    Bug("gptq-group-ahead-without-pending-update", GPTQ,
        "ahead = wt[:, i2:stop] - err1[:, :i] @ hinv[i1:col, i2:stop]", "ahead = wt[:, i2:stop]"),
    Bug("gptq-act-order-not-undone", GPTQ, "q[:, perm] = q_out", "q[:, :] = q_out"),
    Bug("gptq-damp-max", GPTQ, "damp * float(np.mean(np.diag(h)))", "damp * float(np.max(np.diag(h)))"),
    Bug("hqq-zero-sign", "compiler/quant/hqq.py", "z = np.mean(q - (wg - we) / s, axis=1, keepdims=True)",
        "z = np.mean(q - (wg + we) / s, axis=1, keepdims=True)"),
    Bug("hqq-keeps-worse", "compiler/quant/hqq.py", "better = _sq_err(wg, s_new, z, qmax) < _sq_err(wg, s, z0, qmax)",
        "better = np.ones_like(_sq_err(wg, s, z0, qmax), bool)"),
    Bug("hqq-shrink-power", "compiler/quant/hqq.py", "np.power(np.maximum(ax, 1e-12), p - 1)",
        "np.power(np.maximum(ax, 1e-12), p)"),
    Bug("migrate-steps-ratio-fixed", "passes/migrate_steps.py",
        "ratios = [self.options.ratio] if self.options.ratio else [2 ** k for k in range(11)]",
        "ratios = [self.options.ratio] if self.options.ratio else [1024]"),
    # requantize order
    Bug("requantize-shift-before-multiply", OPS,
        "p = acc.astype(np.int64) * b + (np.int64(1) << (c - 1))\n    r = np.right_shift(p, c)",
        "p = np.right_shift(acc.astype(np.int64) + (np.int64(1) << (c - 1)), c)\n    r = p * b"),
    Bug("dyadic-out-zero-point-sign", "passes/dyadic.py",
        "return step, np.asarray(np.clip(np.round(-lo / step), 0, 255), np.uint8)",
        "return step, np.asarray(np.clip(np.round(lo / step), 0, 255), np.uint8)"),
    # ---- session 7: a fresh set, in classes the first 43 did not have ----
    # RoPE: half-split (HF rotate_half) vs interleaved (llama2.c) pairs
    Bug("kv-rope-pairs-half-as-interleaved", "passes/quantize_kv.py",
        'if style == "interleaved":\n        return np.arange(0, rd, 2), np.arange(1, rd, 2)',
        'if style == "half":\n        return np.arange(0, rd, 2), np.arange(1, rd, 2)'),
    # (a first "rope-half-join-swapped", Concat [rb, ra], was dropped: it permutes Q's and K's channels alike, so
    # every score q·k — and every logit — is unchanged; only the cached keys' layout differs)
    Bug("rope-half-model-read-as-interleaved-pairs", FRONT,
        'if spec.rope_style == "half":\n        a, b = g.op("Split", [x], name=f"{name}.halves"',
        'if False:\n        a, b = g.op("Split", [x], name=f"{name}.halves"'),
    Bug("rope-interleaved-read-as-halves", FRONT,
        'pairs = g.op("Reshape", [x, g.const([0, 0, 0, rot // 2, 2])], name=f"{name}.pairs")',
        'pairs = g.op("Reshape", [x, g.const([0, 0, 0, 2, rot // 2])], name=f"{name}.pairs")\n'
        '        pairs = g.op("Transpose", [pairs], name=f"{name}.pairs_t", perm=[0, 1, 2, 4, 3])'),
    # masks: causal off by one, padding sign
    Bug("causal-mask-excludes-the-diagonal", FRONT, 'allowed = g.op("LessOrEqual", [kpos, qpos], name=f"mask.causal_w{window}")',
        'allowed = g.op("Less", [kpos, qpos], name=f"mask.causal_w{window}")'),
    Bug("padding-mask-inverted", FRONT, 'allowed = g.op("And", [allowed, keep], name=f"mask.padded_w{window}")',
        'allowed = g.op("And", [allowed, g.op("Not", [keep])], name=f"mask.padded_w{window}")'),
    Bug("stats-padding-mask-inverted", "compiler/quant/stats.py", "return mask.reshape(-1) != 0",
        "return mask.reshape(-1) == 0"),
    # KV cache: position offset, nibble order, parameter rounding
    Bug("kv-decode-position-offset", "runtime/kv_session.py",
        "pos = np.broadcast_to(np.arange(self.length, self.length + seq, dtype=np.int64), (self.batch, seq))",
        "pos = np.broadcast_to(np.arange(self.length + 1, self.length + seq + 1, dtype=np.int64), (self.batch, seq))"),
    Bug("kv-int4-high-nibble-first", "passes/quantize_kv.py", 'f32(np.array([1.0, 16.0], np.float32))',
        'f32(np.array([16.0, 1.0], np.float32))'),
    Bug("kv-codes-from-unrounded-params", "passes/quantize_kv.py",
        'exact = op("Cast", [params], "params_f32", to=ir.DataType.FLOAT)',
        'exact = op("Concat", [s, mn], "params_f32", axis=-1)'),
    # group boundaries / block sizes
    Bug("grouped-drops-the-partial-last-group", RTN, "return group, -(-k // group)", "return group, k // group"),
    Bug("per-channel-block-one-size-up", RTN, "return max(16, 1 << (k - 1).bit_length()), 1",
        "return max(16, 1 << k.bit_length()), 1"),
    # packing: transpose vs reshape
    Bug("pack-zero-points-reshaped-not-transposed", RTN, "zpt = np.ascontiguousarray(zp.T)  # [N, nb]",
        "zpt = np.ascontiguousarray(zp.reshape(zp.shape[1], zp.shape[0]))  # [N, nb]"),
    Bug("pack-scales-block-major", RTN, '"scales": scale.T.reshape(-1).astype(float_dtype)',
        '"scales": scale.reshape(-1).astype(float_dtype)'),
    # scale / zero-point rounding and dtype
    Bug("migrate-zero-point-floor", "passes/migrate_steps.py", "return np.clip(np.round(-lo / s), 0, 255).astype(np.uint8)",
        "return np.clip(np.floor(-lo / s), 0, 255).astype(np.uint8)"),
    Bug("embedding-scale-through-float16", "passes/quantize_embeddings.py",
        "scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)",
        "scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float16).astype(np.float32)"),
    # axes: per-token vs per-tensor, per-input vs per-output channel, signed mean
    Bug("per-token-step-over-the-whole-tensor", INT8, 'const("axes", np.array([-1], np.int64))',
        'const("axes", np.array([-2, -1], np.int64))'),
    Bug("smooth-weight-max-per-output-channel", "passes/smooth.py",
        "wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)",
        "wmax = np.max([np.resize(np.abs(w).max(axis=0), w.shape[0]) for w in weights], axis=0)"),
    Bug("awq-signed-mean", "passes/awq.py", "mean = np.abs(rows).mean(axis=0)", "mean = np.abs(rows.mean(axis=0))"),
]

EXTRA_COVER = {OPS: ["test_dyadic_lsb.py", "test_integer_ops.py", "test_integer_tiny.py"],
               "backends/nbits.py": [],
               # the decoder frontend's RoPE and masks: logits vs transformers (half-split RoPE, padding), vs an
               # independent numpy forward (llama2.c, interleaved), cached decode vs prefill
               FRONT: ["test_hf_decoders.py", "test_frontends.py", "test_decoder_kv.py", "test_quantize_kv.py"],
               "runtime/kv_session.py": ["test_quantize_kv.py", "test_decoder_kv.py"]}


def _tests(bug: Bug) -> list[str]:
    return sorted({*COVER.get(bug.module, EXTRA_COVER.get(bug.module, [])), *bug.tests})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    for b in bugs:
        n = (ROOT / b.module).read_text().count(b.old)
        if n != 1:
            print(f"{b.name}: the snippet occurs {n} times in {b.module}")
            return 2
    if args.list:
        for b in bugs:
            print(f"{b.name:45s} {b.module}  tests: {' '.join(_tests(b))}")
        return 0
    caught = 0
    with tempfile.TemporaryDirectory(prefix="lowbit-planted-") as tmp:
        stages = queue.Queue()
        for j in range(args.jobs):
            stages.put((Path(tmp) / str(j), stage(Path(tmp) / str(j))))

        def one(b: Bug) -> tuple[Bug, str]:
            folder, where = stages.get()
            path = where[b.module]
            original = path.read_text()
            start = time.perf_counter()
            try:
                path.write_text(original.replace(b.old, b.new))
                why: list[str] = []
                outcome = run_tests(folder, _tests(b), args.timeout, why)
            finally:
                path.write_text(original)
                stages.put((folder, where))
            print(f"{'caught' if outcome == 'killed' else outcome:10s} {b.name} ({time.perf_counter() - start:.0f}s)"
                  + (f" by {why[0]}" if why else ""), flush=True)
            return b, outcome

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
            results = list(ex.map(one, bugs))
    caught = sum(1 for _, o in results if o == "killed")
    print(f"\ncaught {caught} / {len(results)}")
    for b, o in results:
        if o != "killed":
            print(f"  not caught ({o}): {b.name} in {b.module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
