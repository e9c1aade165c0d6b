"""``lowbit inspect MODEL``: inputs, outputs, opsets, op counts, linear layers and their groups."""

from __future__ import annotations

import collections

from lowbit.api.cli import emit


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's interface, ops and linear layers", description=__doc__)
    p.add_argument("model")
    p.add_argument("--tokenizer")
    p.add_argument("--ort-optimized", action="store_true", help="also count the ops ORT runs after optimization")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _describe(value) -> str:
    dims = "?" if value.shape is None else "[" + ", ".join(str(d) if d is not None else "?" for d in value.shape) + "]"
    return f"{value.dtype.name if value.dtype is not None else '?'} {dims}"


def run(args) -> int:
    from lowbit.ir.analysis import find_groups, find_linears
    from lowbit.api.sources import load_model

    model = load_model(args.model, tokenizer=args.tokenizer)
    g = model.graph
    linears = find_linears(g)
    info = {
        "model": args.model,
        "opsets": dict(model.opset_imports),
        "inputs": {v.name: _describe(v) for v in g.inputs},
        "outputs": {v.name: _describe(v) for v in g.outputs},
        "metadata": dict(model.metadata_props),
        "ops": dict(collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in g).most_common()),
        "linears": [{"name": lin.name, "shape": list(lin.shape), "bias": lin.bias is not None} for lin in linears],
        "groups": [{"producer": grp.kind, "consumers": [c.name for c in grp.consumers], "note": grp.reason}
                   for grp in find_groups(g, linears)],
    }
    if args.ort_optimized:
        from lowbit.backends.ort import ort_integer_kernels

        info["ort_optimized_ops"] = dict(ort_integer_kernels(model).most_common())

    def human():
        from rich.console import Console
        from rich.table import Table

        c = Console()
        from rich.markup import escape

        for key in ("model", "opsets", "inputs", "outputs"):
            c.print(f"[bold]{key}[/]: {escape(str(info[key]))}")
        c.print("[bold]ops[/]: " + ", ".join(f"{k}×{v}" for k, v in info["ops"].items()))
        if "ort_optimized_ops" in info:
            c.print("[bold]ORT runs[/]: " + ", ".join(f"{k}×{v}" for k, v in info["ort_optimized_ops"].items()))
        t = Table(title=f"{len(linears)} linear layers")
        for col in ("consumers", "producer", "note"):
            t.add_column(col)
        for grp in info["groups"]:
            t.add_row(", ".join(grp["consumers"]), grp["producer"], grp["note"])
        c.print(t)

    emit(args, info, human)
    return 0
