"""``lowbit report PLAN.json [--plot OUT]``: a mixed-precision plan as a table and a plot.

The table lists every linear: its shape, the chosen bits/group (and the split columns' bits),
the cheap estimate and the measured error of that choice, and its bytes in the written file.
The plot (PNG with matplotlib, else an HTML page with an inline SVG) shows bits and estimated
error per layer.  ``pareto_plot`` draws perplexity against bytes for benchmarks.
"""

from __future__ import annotations

import html
from pathlib import Path

from lowbit.api.cli import emit

__all__ = ["register", "run", "plan_table", "plan_plot", "pareto_plot", "refine_summary"]


def register(sub) -> None:
    p = sub.add_parser("report", help="render a mixed-precision plan (table and plot)", description=__doc__)
    p.add_argument("plan", help="plan JSON written by assign-bits{save=PATH}")
    p.add_argument("--plot", metavar="OUT", help="write a plot here (.png, or .html for the SVG page)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def plan_table(plan):
    from rich.table import Table

    from lowbit.api.report import human_bytes

    t = Table(title=f"plan: budget {plan.budget}={plan.target:g}, estimator {plan.estimator}")
    for col, just in (("layer", "left"), ("shape", "right"), ("bits", "left"), ("est. error", "right"),
                      ("measured", "right"), ("bytes", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for lp in plan.layers:
        nbytes = lp.bytes + (lp.split["bytes"] if lp.split else 0)
        t.add_row(lp.name, "×".join(map(str, lp.shape)), lp.describe(), _fmt(lp.est_error), _fmt(lp.measured_error),
                  f"{nbytes:,}")
    t.add_section()
    t.add_row("linears", f"{plan.weights:,} w", f"W{plan.nominal_bits:.3f}, {plan.avg_bits:.3f} stored b/w", "", "",
              f"{plan.linear_bytes:,}")
    t.add_row("model", "", "", "", "", f"{plan.total_bytes:,} ({human_bytes(plan.total_bytes)})")
    return t


def refine_summary(plan) -> str:
    """One line on how ``assign-bits{refine=N}`` moved the plan, or '' when it did not run."""
    ref = plan.extra.get("refine")
    if not ref:
        return ""
    start = ref["steps"][0]["starts"]
    accepted = [st for st in ref["steps"] if st.get("accepted")]
    others = ", ".join(f"{k} {v:.4g}" for k, v in sorted(start.items(), key=lambda kv: kv[1])[:3])
    return (f"refined from '{ref['start']}': joint calibration {ref['metric']} {start[ref['start']]:.5g} → "
            f"{ref['loss']:.5g} in {len(accepted)} accepted step(s) ({sum(st['changes'] for st in accepted)} layer "
            f"changes); best starts: {others}")


def _svg_bars(labels, values, title, ylabel, width=900, height=320) -> str:
    n = max(len(values), 1)
    top = max([v for v in values if v is not None] + [1e-12])
    bw = (width - 80) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 120}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
             f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})">'
             f'{html.escape(ylabel)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = 0 if v is None else (height - 40) * v / top
        x = 60 + i * bw
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bw * 0.8:.1f}" height="{h:.1f}" fill="#4477aa">'
                     f'<title>{html.escape(lab)}: {v}</title></rect>')
        parts.append(f'<text x="{x + bw * 0.4:.1f}" y="{height + 8}" font-size="9" '
                     f'transform="rotate(60 {x + bw * 0.4:.1f} {height + 8})">{html.escape(lab)}</text>')
    parts.append(f'<line x1="58" y1="{height}" x2="{width - 20}" y2="{height}" stroke="black"/></svg>')
    return "".join(parts)


def plan_plot(plan, out: str | Path) -> Path:
    out = Path(out)
    labels = [lp.name for lp in plan.layers]
    bits = [lp.bits if not lp.split else (lp.bits * (lp.shape[1] - len(lp.split["columns"]))
                                          + lp.split["bits"] * len(lp.split["columns"])) / lp.shape[1]
            for lp in plan.layers]
    errors = [lp.measured_error if lp.measured_error is not None else lp.est_error for lp in plan.layers]
    title = (f"{plan.budget}={plan.target:g} ({plan.estimator}): W{plan.nominal_bits:.3f}, "
             f"{plan.avg_bits:.3f} stored bits/w, {plan.total_bytes:,} B")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out = out.with_suffix(".html")
        body = _svg_bars(labels, bits, title, "bits per weight") + _svg_bars(labels, errors, "error of the choice",
                                                                             "error")
        out.write_text(f"<!doctype html><meta charset='utf-8'><title>lowbit plan</title><body>{body}</body>")
        return out
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    a1.bar(range(len(bits)), bits, color="#4477aa")
    a1.set_ylabel("bits per weight")
    a1.set_title(title)
    a2.bar(range(len(errors)), [e or 0 for e in errors], color="#cc6677")
    a2.set_ylabel("measured error" if plan.estimator != "cheap" else "estimated error")
    a2.set_xticks(range(len(labels)), labels, rotation=80, fontsize=7)
    fig.tight_layout()
    out = out.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pareto_plot(rows: list[dict], stem: str | Path, title: str = "") -> Path:
    """Perplexity against bytes; ``rows`` carry name, kind, bytes, ppl, pareto."""
    stem = Path(stem)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        xs, ys = [r["bytes"] for r in rows], [r["ppl"] for r in rows]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        pts = []
        for r in rows:
            x = 60 + 700 * (r["bytes"] - x0) / max(x1 - x0, 1)
            y = 380 - 340 * (r["ppl"] - y0) / max(y1 - y0, 1e-9)
            pts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{"#cc3311" if r["pareto"] else "#4477aa"}">'
                       f'<title>{html.escape(r["name"])}: {r["bytes"]:,} B, ppl {r["ppl"]:.4f}</title></circle>')
        svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="800" height="420">{"".join(pts)}</svg>'
        out = stem.with_suffix(".html")
        out.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><h3>"
                       f"{html.escape(title)}: perplexity vs bytes</h3>{svg}")
        return out
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in rows:
        if r["kind"] == "float":  # far to the right: a reference line keeps the quantized points readable
            ax.axhline(r["ppl"], color="grey", lw=0.8, ls=":", label=f"{r['name']} ({r['bytes'] / 1024:.0f} KiB)")
    rows = [r for r in rows if r["kind"] != "float"]
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["bytes"] / 1024 for r in sel], [r["ppl"] for r in sel], label=kind, s=28)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["bytes"])
    ax.plot([r["bytes"] / 1024 for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto front")
    for r in rows:
        ax.annotate(r["name"], (r["bytes"] / 1024, r["ppl"]), fontsize=6, alpha=0.7)
    ax.set_xlabel("model bytes (KiB)")
    ax.set_ylabel("perplexity (held-out stories)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = stem.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def run(args) -> int:
    from lowbit.mixed.bitplan import Plan

    if args.plot:
        from lowbit.api.preflight import check_parent

        check_parent(args.plot, "--plot")
    plan = Plan.load(args.plan)
    plot = None
    if args.plot:  # written whole or not at all
        from lowbit.ir.staging import ArtifactSet

        with ArtifactSet(args.plot) as art:
            written = plan_plot(plan, art.dir / Path(args.plot).name)
            art.commit()
        plot = Path(args.plot).parent / written.name
    payload = {"plan": args.plan, "avg_bits": plan.avg_bits, "nominal_bits": plan.nominal_bits,
               "linear_bytes": plan.linear_bytes,
               "total_bytes": plan.total_bytes, "plot": str(plot) if plot else None,
               "layers": [{"name": lp.name, "bits": lp.bits, "group": lp.group, "split": lp.split,
                           "est_error": lp.est_error, "measured_error": lp.measured_error,
                           "bytes": lp.bytes + (lp.split["bytes"] if lp.split else 0)} for lp in plan.layers],
               "refine": plan.extra.get("refine")}

    def human():
        from rich.console import Console

        c = Console()
        c.print(plan_table(plan))
        if line := refine_summary(plan):
            c.print(line)
        if plot:
            c.print(f"plot: {plot}")

    emit(args, payload, human)
    return 0
