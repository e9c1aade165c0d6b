"""Pass-manager instruments: timing, IR dumps, verify-each, reproducers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lowbit.errors import PassFailure
from lowbit.passmanager.manager import Instrument, Pass

__all__ = ["TimingInstrument", "DumpIRInstrument", "VerifyInstrument", "ReproducerInstrument"]

logger = logging.getLogger(__name__)


class TimingInstrument(Instrument):
    """Collects (pass, seconds, stats) rows; ``table()`` renders them."""

    def __init__(self):
        self.rows: list[tuple[str, float, dict]] = []

    def after_pass(self, p, model, result, seconds):
        self.rows.append((str(p.item), seconds, dict(p.stats)))

    def table(self):
        from rich.table import Table

        t = Table(title="lowbit passes")
        t.add_column("pass")
        t.add_column("seconds", justify="right")
        t.add_column("statistics")
        for name, sec, stats in self.rows:
            t.add_row(name, f"{sec:.3f}", ", ".join(f"{k}={v}" for k, v in stats.items()))
        return t


class DumpIRInstrument(Instrument):
    """Writes the IR as text after every pass that changed it: ``DIR/NN-pass.txt``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def after_pass(self, p, model, result, seconds):
        self.count += 1
        if result.modified:
            (self.dir / f"{self.count:02d}-{p.name}.txt").write_text(str(model.graph))


class VerifyInstrument(Instrument):
    """After each pass: ONNX checker; for float-equivalent passes, outputs before == after.

    The equivalence check runs ORT on ``ctx.probes`` (or the first calibration samples) before
    and after the pass and requires ``max|after - before| <= rtol * max|before| + atol``.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 0.0, check_float: bool = True, max_probes: int = 2):
        self.rtol, self.atol, self.check_float, self.max_probes = rtol, atol, check_float, max_probes
        self._before: list[list[np.ndarray]] | None = None
        self.checked: list[tuple[str, float]] = []

    def _probes(self, p: Pass):
        feeds = p.ctx.probes or p.ctx.calibration or []
        return feeds[: self.max_probes]

    def _outputs(self, model, feeds):
        from lowbit.ir.sessions import make_session

        sess = make_session(model, optimize=False)
        # a KV graph's cache (present.*) is internal state a pass may re-encode (rotated or smoothed V,
        # quantized codes); equivalence is judged on the other outputs (logits)
        names = [o.name for o in sess.get_outputs() if not o.name.startswith("present.")]
        return [sess.run(names, f) for f in feeds]

    def before_pass(self, p, model):
        self._before = None
        if self.check_float and p.float_equivalent and self._probes(p):
            self._before = self._outputs(model, self._probes(p))

    def after_pass(self, p, model, result, seconds):
        import onnx

        from lowbit.ir.sessions import needs_file, saved_copy, to_proto

        try:
            if needs_file(model):  # external or > 2 GB weights: check a saved copy
                with saved_copy(model) as path:
                    onnx.checker.check_model(str(path), full_check=False)
            else:
                onnx.checker.check_model(to_proto(model), full_check=False)
        except Exception as exc:
            raise PassFailure(p.name, f"produced an invalid model: {exc}") from exc
        if self._before is None or not result.modified:
            return
        after = self._outputs(model, self._probes(p))
        worst = 0.0
        for outs_b, outs_a in zip(self._before, after):
            for b, a in zip(outs_b, outs_a):
                scale = float(np.max(np.abs(b))) or 1.0
                err = float(np.max(np.abs(a.astype(np.float64) - b))) / scale
                worst = max(worst, err)
                if not np.all(np.abs(a.astype(np.float64) - b) <= self.rtol * scale + self.atol):
                    raise PassFailure(p.name, f"claims float equivalence but outputs changed by {err:.3g} "
                                              f"relative (tolerance {self.rtol:g})")
        self.checked.append((p.name, worst))


class ReproducerInstrument(Instrument):
    """Keeps the model as it was before each pass; on failure writes it with the pipeline string.

    Writes ``DIR/input.onnx`` and ``DIR/pipeline.txt`` (the failing pass and the rest of the
    pipeline) so ``lowbit compile DIR/input.onnx --recipe "$(cat DIR/pipeline.txt)"`` reproduces it.
    """

    def __init__(self, directory: str | Path, pipeline: str):
        self.dir = Path(directory)
        self.pipeline = pipeline
        self._snapshot: bytes | None = None
        self._names: list[str] = []

    def before_pass(self, p, model):
        from lowbit.ir.sessions import to_proto

        self._names.append(str(p.item))
        try:
            self._snapshot = to_proto(model).SerializeToString()
        except Exception as exc:  # > 2 GB: cannot snapshot in one protobuf
            logger.warning("reproducer: cannot snapshot the model before '%s': %s", p.name, exc)
            self._snapshot = None

    def on_failure(self, p, model, exc):
        from lowbit.passmanager.pipeline import parse_pipeline

        if self._snapshot is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "input.onnx").write_bytes(self._snapshot)
        items = parse_pipeline(self.pipeline).items
        rest = items[len(self._names) - 1:]  # the failing pass and everything after it
        (self.dir / "pipeline.txt").write_text(",".join(str(i) for i in rest) + "\n")
        (self.dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        logger.error("reproducer written to %s", self.dir)
