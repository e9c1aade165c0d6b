"""Helpers shared by the benchmark scripts: ORT's own quantizers as baselines, latency, sizes."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["ort_static", "ort_dynamic", "latency_ms", "file_mb", "workdir", "session"]


def workdir() -> Path:
    path = Path(os.environ.get("LOWBIT_BENCH_DIR", tempfile.mkdtemp(prefix="lowbit-bench-")))
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Reader:
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def ort_static(float_path: Path, feeds: list[dict], out: Path, op_types=None, per_channel=False) -> Path:
    """ORT ``quantize_static``: QDQ, uint8 activations, int8 weights, MinMax calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(float_path), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.MinMax)
    return out


def ort_dynamic(float_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8)
    return out


def session(path, threads: int = 2):
    from lowbit.ir.sessions import make_session

    return make_session(path, threads=threads)


def latency_ms(sess, feed: dict, seconds: float = 1.5, min_iters: int = 5) -> float:
    """Median wall time of ``sess.run`` over about ``seconds``."""
    for _ in range(2):
        sess.run(None, feed)
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def file_mb(path: Path) -> float:
    total = Path(path).stat().st_size
    data = Path(str(path) + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 2**20


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)

