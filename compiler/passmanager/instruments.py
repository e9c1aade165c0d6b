"""Pass-manager instruments: timing, IR dumps, verify-each, reproducers."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from lowbit.errors import PassFailure
from lowbit.passmanager.manager import Instrument, Pass, add_default_instrument
from lowbit.passmanager.properties import Prop, check_property

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
    """After each pass, checks that the pass told the truth about what it did.

    * the ONNX checker accepts the model;
    * every property the pass ensures holds on the IR (``lowbit.passmanager.properties``), and so
      does every property that held before it and that it does not declare invalidated;
    * ``modified``: a digest of the serialized model before and after must differ exactly when the
      pass says it modified the model;
    * a ``float_equivalent`` pass leaves ORT's outputs on ``ctx.probes`` (or the first calibration
      samples) unchanged: ``max|after - before| <= rtol * max|before| + atol``.

    Tests turn it on for every pipeline and every pass called on its own (``LOWBIT_VERIFY=1``).
    Models too large to serialize in one protobuf skip the digest and property re-checks that
    need a session.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 0.0, check_float: bool = True, max_probes: int = 2):
        self.rtol, self.atol, self.check_float, self.max_probes = rtol, atol, check_float, max_probes
        self._before: list[list[np.ndarray]] | None = None
        self._digest: str | None = None
        self._held: set[Prop] = set()
        self.checked: list[tuple[str, float]] = []
        self.verified: list[str] = []  # names of the passes verified, in order

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

    @staticmethod
    def _digest_of(model) -> str | None:
        from lowbit.ir.sessions import needs_file, to_proto

        if needs_file(model):
            return None
        return hashlib.sha256(to_proto(model).SerializeToString(deterministic=True)).hexdigest()

    def before_pass(self, p, model):
        self._before = None
        self._valid_before = self._checker_error(model) is None  # a pass is not blamed for its input
        self._digest = self._digest_of(model)
        claimed = {Prop(x) for x in p.ctx.properties if x in Prop._value2member_map_}
        self._held = {x for x in claimed if check_property(x, model) is None}
        if self.check_float and p.float_equivalent and self._probes(p):
            self._before = self._outputs(model, self._probes(p))

    def after_pass(self, p, model, result, seconds):
        if getattr(self, "_valid_before", True):
            problem = self._checker_error(model)
            if problem is not None:
                raise PassFailure(p.name, f"produced an invalid model: {problem}")
        self._check_modified(p, model, result)
        self._check_properties(p, model)
        self.verified.append(p.name)
        if self._before is None or not result.modified:
            return
        after = self._outputs(model, self._probes(p))
        worst = 0.0
        for outs_b, outs_a in zip(self._before, after):
            for b, a in zip(outs_b, outs_a):
                scale = float(np.max(np.abs(b))) or 1.0
                err = float(np.max(np.abs(a.astype(np.float64) - b))) / scale
                worst = max(worst, err)
                # an output of a narrower float type (float16 interface) rounds once more: one ulp of it
                rtol = max(self.rtol, float(np.finfo(b.dtype).eps)) if b.dtype.kind == "f" else self.rtol
                if not np.all(np.abs(a.astype(np.float64) - b) <= rtol * scale + self.atol):
                    raise PassFailure(p.name, f"claims float equivalence but outputs changed by {err:.3g} "
                                              f"relative (tolerance {rtol:g})")
        self.checked.append((p.name, worst))

    @staticmethod
    def _checker_error(model) -> str | None:
        import onnx

        from lowbit.ir.sessions import needs_file, saved_copy, to_proto

        from lowbit.frontends.onnx_file import ort_ops_for_checker

        try:
            with ort_ops_for_checker(model):  # ORT's ONNX-domain contrib ops are not ONNX ops
                if needs_file(model):  # external or > 2 GB weights: check a saved copy
                    with saved_copy(model) as path:
                        onnx.checker.check_model(str(path), full_check=False)
                else:
                    onnx.checker.check_model(to_proto(model), full_check=False)
        except Exception as exc:  # noqa: BLE001 - any checker complaint
            return str(exc)
        return None

    def _check_modified(self, p, model, result) -> None:
        after = self._digest_of(model)
        if self._digest is None or after is None:
            return
        changed = after != self._digest
        if changed and not result.modified:
            raise PassFailure(p.name, "reported modified=False but the serialized model changed",
                              hint="return PassResult(model, modified=True) whenever the pass edits the IR")
        if result.modified and not changed:
            raise PassFailure(p.name, "reported modified=True but the serialized model is unchanged",
                              hint="report modified only when the pass edited the IR")

    def _check_properties(self, p, model) -> None:
        invalidated = {Prop(x) for x in p.invalidates_properties}
        ensured = {Prop(x) for x in p.ensures_properties}
        for prop in sorted(ensured | (self._held - invalidated), key=str):
            problem = check_property(prop, model)
            if problem is None:
                continue
            if prop in ensured:
                raise PassFailure(p.name, f"declares it ensures '{prop}' but {problem}",
                                  hint="fix the pass or its ensures_properties")
            raise PassFailure(p.name, f"broke '{prop}' without declaring it in invalidates_properties: {problem}",
                              hint="declare the property invalidated, or keep it")


def _verify_from_env() -> VerifyInstrument | None:
    """The default instrument: verify-each when ``LOWBIT_VERIFY=1`` (the tests set it)."""
    return VerifyInstrument() if os.environ.get("LOWBIT_VERIFY") == "1" else None


add_default_instrument(_verify_from_env)


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
