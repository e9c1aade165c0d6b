"""Human-readable reports (rich tables) of compile and evaluation results."""

from __future__ import annotations

__all__ = ["summary_table", "human_bytes"]


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(report: dict):
    from rich.table import Table

    t = Table(title="lowbit compile", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    rows = [("model", report.get("source")), ("kind", report.get("kind")), ("pipeline", report.get("pipeline")),
            ("calibration samples", report.get("calibration_samples")),
            ("float weights", human_bytes(report.get("float_weight_bytes", 0))),
            ("compiled weights", human_bytes(report.get("weight_bytes", 0)))]
    if "file_bytes" in report:
        rows.append(("output", f"{report['output']} ({human_bytes(report['file_bytes'])})"))
    cal = report.get("calibration")
    if cal:
        rows.append(("calibration data", f"{cal['sequences']} sequences, {cal['tokens']} tokens "
                                         f"({cal['samples']} samples)"))
    by_reason: dict[str, list[str]] = {}
    for item in (report.get("smooth") or {}).get("unsmoothed", []):
        by_reason.setdefault(item["reason"], []).append(item["layer"])
    for reason, layers in by_reason.items():
        rows.append((f"unsmoothed ({len(layers)})", f"{', '.join(layers)}: {reason}"))
    for item in report.get("float_layers", []):
        rows.append(("kept float", f"{item['layer']}: {item['reason']}"))
    q = report.get("quantize")
    if q:
        rows.append(("quantized linears", f"{q['linears']} ({q['mode']})"))
    lo = report.get("lower-ort")
    if lo and "ort_integer_gemms" in lo:
        rows.append(("ORT integer GEMMs", f"{lo['ort_integer_gemms']} of {lo['integer_linears']} quantized linears"))
    for key, value in report.get("metrics", {}).items():
        rows.append((key, value))
    rows.append(("seconds", report.get("seconds")))
    for k, v in rows:
        t.add_row(k, str(v))
    return t
