"""Perplexity against model bytes on stories260K: uniform RTN, ORT's RTN, and assign-bits plans.

Calibrates on CALIB_STORIES, evaluates perplexity on the held-out EVAL_STORIES.  Weight-only
quantization is simulated exactly: every linear's weight is replaced by its dequantized value
(``lowbit.mixed.bitplan.fake_quant_proto``) in a copy of the float model, which is what a weight-only
quantized model computes (up to float rounding order).  Sizes are the model's initializer bytes
with the linears in the packed storage format (checked against real packed buffers for every plan).
ORT's own RTN (``MatMulNBitsQuantizer``) runs on the real MatMulNBits kernels; its size is the
initializer bytes of the model it writes.

ILP rows: nominal budgets (W2.5/3.0/3.5, groups free or pinned to 32/64/128), stored-bits
budgets (2.75/3.0/3.5 bits per weight, scales included), and byte budgets equal to every uniform
plan's size, for the cheap and measured estimators; then the same budgets with ``refine`` (slow:
minutes a row).  Every ILP row is compared with the smallest uniform plan at least as large.

    python benchmarks/mixed_precision.py [--targets 2.5,3.0,3.5] [--eval-stories 600:785] [--refine 2]
    # in parallel: --shard 0/2 and --shard 1/2, then once without --shard to gather the table

Writes ``benchmarks/results/mixed_precision.{json,md,png|html}`` and the plans beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.ir.analysis import find_linears
from lowbit.mixed.bitplan import LayerPlan, Plan, fake_quant_proto, plan_bytes
from lowbit.errors import LowbitError
from lowbit.data.datasets import CALIB_STORIES, EVAL_STORIES, causal_lm_feeds, data_dir, read_stories
from lowbit.frontends import load_model
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.rtn import storage_bytes
from lowbit.runtime.llm import perplexity, token_stream
from lowbit.ir.sessions import make_session, to_proto
from lowbit.data.tokenizers import Llama2cTokenizer

RESULTS = Path(__file__).resolve().parent / "results"
SIZE_REFS = ("uniform 2b g32", "uniform 3b gch", "uniform 3b g128", "uniform 3b g64", "uniform 3b g32",
             "uniform 4b g64", "uniform 4b g128")  # the ILP is also solved at exactly these uniform plans' model bytes


def uniform_plan(linears, bits: int, group: int, fixed: int) -> Plan:
    layers = []
    for lin in linears:
        k, n = lin.shape
        g = 0 if group == 0 or group >= k else group
        layers.append(LayerPlan(lin.name, [k, n], bits, g, storage_bytes(k, n, bits, g)))
    return Plan(layers, budget="uniform", target=bits, estimator="-", fixed_bytes=fixed)


def evaluate_plan(model, plan: Plan | None, stream) -> float:
    proto = to_proto(model) if plan is None else fake_quant_proto(model, plan)
    return perplexity(make_session(proto, threads=1), stream, batch=1).nll


def plan_path(label: str) -> Path:
    return RESULTS / ("plan-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in label) + ".json")


def ort_rtn(model, bits: int, block: int, stream) -> tuple[float, int]:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    q = MatMulNBitsQuantizer(to_proto(model), bits=bits, block_size=block, is_symmetric=False, accuracy_level=0)
    q.process()
    proto = q.model.model
    size = sum(len(t.raw_data) or onnx_tensor_bytes(t) for t in proto.graph.initializer)
    sess = make_session(proto, threads=1, matmulnbits_accuracy_level=0)
    return perplexity(sess, stream, batch=1).nll, size


def onnx_tensor_bytes(t) -> int:
    import onnx

    return onnx.numpy_helper.to_array(t).nbytes


def pareto(rows: list[dict]) -> None:
    for r in rows:
        r["pareto"] = not any(o["bytes"] <= r["bytes"] and o["ppl"] < r["ppl"] for o in rows if o is not r)


def compare(rows: list[dict]) -> list[str]:
    """For every ILP plan: the smallest uniform RTN at least as large, and the best one no larger."""
    uni = [r for r in rows if r["kind"] in ("uniform", "ort")]
    out = ["| ILP plan | bytes | ppl | next larger uniform (bytes, ppl) | ILP better? | best uniform ≤ size (ppl) |",
           "|---|---:|---:|---|:-:|---|"]
    for r in (r for r in rows if r["kind"].startswith("ilp")):
        larger = sorted((u for u in uni if u["bytes"] >= r["bytes"]), key=lambda u: u["bytes"])
        smaller = sorted((u for u in uni if u["bytes"] <= r["bytes"]), key=lambda u: u["ppl"])
        nl = larger[0] if larger else None
        out.append(f"| {r['name']} | {r['bytes']:,} | {r['ppl']:.3f} | "
                   + (f"{nl['name']} ({nl['bytes']:,}, {nl['ppl']:.3f}) | {'yes' if r['ppl'] < nl['ppl'] else 'no'}"
                      if nl else "- | -")
                   + (f" | {smaller[0]['name']} ({smaller[0]['ppl']:.3f}) |" if smaller else " | - |"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="2.5,3.0,3.5")
    ap.add_argument("--estimators", default="cheap,measured,measured-kl")
    ap.add_argument("--split", type=float, default=0.125, help="also solve with this column-split fraction (0: off)")
    ap.add_argument("--allin-targets", default="2.75,3.0,3.5", help="avg_bits (scales included) targets")
    ap.add_argument("--eval-stories", default=f"{EVAL_STORIES.start}:{EVAL_STORIES.stop}")
    ap.add_argument("--no-ort", action="store_true", help="skip ORT's RTN rows")
    ap.add_argument("--refine", type=int, default=2, help="rounds of assign-bits refine for the refined rows (0: none)")
    ap.add_argument("--refine-estimators", default="measured-kl")
    ap.add_argument("--gptq", default="", help=f"also materialise these rows with GPTQ on real kernels "
                    f"(comma-separated names; 'default': {GPTQ_ROWS})")
    ap.add_argument("--only", default="", help="only ILP rows whose label contains one of these (comma-separated)")
    ap.add_argument("--shard", default="0/1", help="i/n: this process solves every n-th ILP row from the i-th "
                    "(run n shards in parallel, then once without --shard to gather the table from the caches)")
    args = ap.parse_args(argv)
    if args.gptq == "default":
        args.gptq = GPTQ_ROWS
    d = data_dir()
    if not (d / "stories260K" / "stories260K.bin").is_file():
        print(f"no stories260K under {d}; set LOWBIT_DATA", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    a, b = (int(x) for x in args.eval_stories.split(":"))
    stream = token_stream(tok, stories[a:b])
    feeds = causal_lm_feeds(tok, stories[CALIB_STORIES], seq_len=256)
    model = load_model(d / "stories260K" / "stories260K.bin")
    ctx = CompileContext(calibration=feeds, show_progress=True)
    model = PassManager.from_pipeline("calibrate{hessian=true}", ctx).run(model)
    linears = find_linears(model.graph)
    weights = {lin.name: lin.weight.const_value.numpy() for lin in linears}
    wnames = {lin.weight.name for lin in linears}
    fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n not in wnames)
    rows = []

    memo_path = RESULTS / "eval-cache.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}

    def save_memo():  # atomic, merged with other shards' results
        if memo_path.is_file():
            memo.update({k: v for k, v in json.loads(memo_path.read_text()).items() if k not in memo})
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)

    def evaluate(model, plan, stream):  # re-evaluating an identical plan reuses the result
        key = f"{a}:{b}|" + ("float" if plan is None else json.dumps(
            [(lp.name, lp.bits, lp.group, lp.split and (lp.split["bits"], lp.split["group"], lp.split["columns"]))
             for lp in plan.layers]))
        if key not in memo:
            memo[key] = evaluate_plan(model, plan, stream)
            save_memo()
        return memo[key]

    def add(name, kind, plan, nll, size=None):
        size = plan.total_bytes if size is None else size
        if plan is not None:
            assert plan_bytes(plan, weights) == plan.linear_bytes, name  # counted = packed buffers
        avg = plan.avg_bits if plan is not None else 32.0
        nominal = plan.nominal_bits if plan is not None else 32.0
        rows.append({"name": name, "kind": kind, "bytes": int(size), "avg_bits": round(avg, 4),
                     "nominal_bits": round(nominal, 4), "nll": nll, "ppl": float(np.exp(nll))})
        print(f"{name:<34} {size:>9,d} B  {avg:6.3f} b/w  W{nominal:.3f}  ppl {np.exp(nll):8.4f}", flush=True)

    t0 = time.time()
    add("float32", "float", None, evaluate(model, None, stream),
        fixed + sum(w.nbytes for w in weights.values()))
    for bits, groups in ((2, (32, 128)), (3, (32, 64, 128, 0)), (4, (32, 64, 128, 0)), (8, (0,))):
        for group in groups:
            plan = uniform_plan(linears, bits, group, fixed)
            add(f"uniform {bits}b g{group or 'ch'}", "uniform", plan, evaluate(model, plan, stream))
    if not args.no_ort:
        for bits, block in ((4, 32), (4, 128)):
            try:
                key = f"{a}:{b}|ort-rtn-{bits}-{block}"
                if key not in memo:
                    memo[key] = ort_rtn(model, bits, block, stream)
                    save_memo()
                nll, size = memo[key]
                rows.append({"name": f"ORT RTN {bits}b b{block}", "kind": "ort", "bytes": size,
                             "avg_bits": round(8 * (size - fixed) / sum(w.size for w in weights.values()), 4),
                             "nominal_bits": float(bits), "nll": nll, "ppl": float(np.exp(nll))})
                print(f"ORT RTN {bits}b b{block}: {size:,d} B ppl {np.exp(nll):.4f}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a missing ORT feature must not stop the benchmark
                print(f"ORT RTN {bits}b b{block} failed: {exc}", flush=True)
    ilp = []  # (label, kind, options)
    for est in args.estimators.split(","):
        for target in args.targets.split(","):
            ilp.append((f"ILP W{target} {est}", f"ilp-nominal-{est}",
                        f"budget=nominal_bits,target={target},estimator={est}"))
    for est in ("measured", "measured-kl"):
        for g in (32, 64, 128):
            for target in args.targets.split(",")[1:]:
                ilp.append((f"ILP W{target} g{g} {est}", f"ilp-nominal-g-{est}",
                            f"budget=nominal_bits,target={target},estimator={est},groups={g}"))
    for est in args.estimators.split(","):
        for target in args.allin_targets.split(","):
            ilp.append((f"ILP {target} b/w {est}", f"ilp-allin-{est}", f"target={target},estimator={est}"))
    if args.split:
        for target in args.targets.split(",")[1:]:
            ilp.append((f"ILP W{target} measured split", "ilp-nominal-split",
                        f"budget=nominal_bits,target={target},estimator=measured,split={args.split}"))
    sizes = {r["name"][8:]: r["bytes"] for r in rows if r["kind"] == "uniform" and r["name"] in SIZE_REFS}
    for est in ("measured", "measured-kl"):
        for ref, size in sizes.items():
            ilp.append((f"ILP =size({ref}) {est}", f"ilp-bytes-{est}", f"budget=bytes,target={size},estimator={est}"))
    if args.refine:  # the same budgets, re-measured around the plan (lowbit.mixed.refine); slow, so last
        r = f",refine={args.refine}"
        for est in args.refine_estimators.split(","):
            for target in args.allin_targets.split(",")[1:]:
                ilp.append((f"ILP {target} b/w {est} refined", f"ilp-allin-{est}-refined",
                            f"target={target},estimator={est}{r}"))
            for g in (32, 64, 128):
                for target in args.targets.split(",")[1:]:
                    ilp.append((f"ILP W{target} g{g} {est} refined", f"ilp-nominal-g-{est}-refined",
                                f"budget=nominal_bits,target={target},estimator={est},groups={g}{r}"))
            for ref, size in sizes.items():
                if ref.startswith("2b"):  # every plan that small is hopeless (ppl > 80)
                    continue
                ilp.append((f"ILP =size({ref}) {est} refined", f"ilp-bytes-{est}-refined",
                            f"budget=bytes,target={size},estimator={est}{r}"))
    ilp_options = {label: options for label, _, options in ilp}
    if args.only:
        ilp = [row for row in ilp if any(p in row[0] for p in args.only.split(","))]
    shard, shards = (int(x) for x in args.shard.split("/"))
    for label, kind, options in ilp[shard::shards]:
        path = plan_path(label)
        ctx.report.clear()
        try:
            PassManager.from_pipeline(f"assign-bits{{{options},save={path}}}", ctx).run(model)
        except LowbitError as exc:
            print(f"{label}: infeasible ({exc.message})", flush=True)
            continue
        plan = Plan.from_dict(ctx.report["assign-bits"]["plan"])
        add(label, kind, plan, evaluate(model, plan, stream))
        if "refine" in plan.extra:
            ref = plan.extra["refine"]
            rows[-1]["refine"] = {"start": ref["start"], "start_loss": ref["steps"][0]["starts"][ref["start"]],
                                  "loss": ref["loss"], "metric": ref["metric"],
                                  "accepted": sum(1 for st in ref["steps"] if st.get("accepted"))}
            print(f"   refined from {ref['start']}: calibration {ref['metric']} "
                  f"{rows[-1]['refine']['start_loss']:.5f} -> {ref['loss']:.5f}", flush=True)
        (RESULTS / "mixed_precision.json").write_text(json.dumps(rows, indent=1))  # partial results survive
    pareto(rows)
    (RESULTS / "mixed_precision.json").write_text(json.dumps(rows, indent=1))
    lines = ["| config | model bytes | stored bits/w | nominal bits/w | NLL | ppl | Pareto |",
             "|---|---:|---:|---:|---:|---:|:-:|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['avg_bits']:.3f} | {r['nominal_bits']:.3f} | "
                     f"{r['nll']:.4f} | {r['ppl']:.4f} | "
                     f"{'*' if r['pareto'] else ''} |")
    table = "\n".join(lines + [""] + compare(rows))
    (RESULTS / "mixed_precision.md").write_text(table + "\n")
    print(table)
    from lowbit.api.commands.report import pareto_plot

    plot = pareto_plot(rows, RESULTS / "mixed_precision", title=f"stories260K, stories {a}:{b}")
    if args.gptq:
        gptq = gptq_table(args.gptq.split(","), rows, linears, fixed, d, feeds, stream, memo, save_memo, f"{a}:{b}",
                          model, ctx, ilp_options)
        (RESULTS / "mixed_precision.md").write_text(table + "\n\n" + gptq + "\n")
        print(gptq)
    print(f"plot: {plot}\nseconds: {time.time() - t0:.0f}")
    return 0


GPTQ_ROWS = ("uniform 3b gch,uniform 3b g64,uniform 3b g32,uniform 4b g64,uniform 4b g128,"
             "ILP 3.0 b/w measured-kl refined,ILP 3.5 b/w measured-kl refined,ILP W3.5 g64 measured-kl refined,"
             "ILP =size(3b gch) measured-kl refined,ILP =size(3b g32) measured-kl refined,"
             "ILP =size(4b g64) measured-kl refined")


def gptq_table(labels, rows, linears, fixed, d, feeds, stream, memo, save_memo, span, model, ctx, ilp_options) -> str:
    """The same plans materialised by GPTQ (asymmetric) and run on ORT's kernels (3-bit via the fast path);
    ILP rows also re-solved with ``quantizer=gptq`` (sensitivity measured on GPTQ weights, refine dropped)."""
    import hashlib

    from lowbit.runtime.fastpath import fast_session

    def materialise(plan):
        digest = hashlib.sha256(json.dumps([(lp.name, lp.bits, lp.group) for lp in plan.layers]).encode()).hexdigest()
        key = f"{span}|gptq|{digest[:16]}"
        if key not in memo:
            path = RESULTS / "gptq-plan.json"
            plan.save(path)
            c = CompileContext(calibration=feeds, show_progress=False)
            m = PassManager.from_pipeline(
                f"calibrate{{hessian=true}},assign-bits{{plan={path}}},quantize-weights{{method=gptq,symmetric=false}},"
                "lower-nbits", c).run(load_model(d / "stories260K" / "stories260K.bin"))
            size = sum(v.const_value.nbytes for v in m.graph.initializers.values())
            memo[key] = (perplexity(fast_session(m), stream, batch=1).nll, size)
            save_memo()
        nll, size = memo[key]
        assert size == plan.total_bytes, (size, plan.total_bytes)  # the written model holds the planned bytes
        return nll, size

    by_name = {r["name"]: r for r in rows}
    out = ["| plan, GPTQ-materialised | written bytes | ppl (GPTQ) | ppl (RTN) | GPTQ-aware ILP: bytes, ppl |",
           "|---|---:|---:|---:|---|"]
    for label in labels:
        if label not in by_name:
            print(f"gptq: no row '{label}'", flush=True)
            continue
        if label.startswith("uniform"):
            bits, group = label.split()[1:]
            plan = uniform_plan(linears, int(bits[:-1]), 0 if group == "gch" else int(group[1:]), fixed)
        else:
            plan = Plan.load(plan_path(label))
        nll, size = materialise(plan)
        aware = "-"
        if label in ilp_options:
            options = ",".join(o for o in ilp_options[label].split(",") if not o.startswith("refine="))
            ctx.report.clear()
            PassManager.from_pipeline(f"assign-bits{{{options},quantizer=gptq}}", ctx).run(model)
            anll, asize = materialise(Plan.from_dict(ctx.report["assign-bits"]["plan"]))
            aware = f"{asize:,}, {np.exp(anll):.3f}"
        out.append(f"| {label} | {size:,} | {np.exp(nll):.3f} | {by_name[label]['ppl']:.3f} | {aware} |")
        print(out[-1], flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
