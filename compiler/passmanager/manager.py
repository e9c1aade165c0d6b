"""Passes, their registry, and the pass manager that runs a pipeline over an ``ir.Model``.

A pass is an ``onnx_ir`` in-place pass with a kebab-case ``name``, a frozen ``Options``
dataclass that validates itself, the IR *properties* it requires and ensures (checked by the
manager), statistics, and a flag saying whether it preserves float semantics (checked by the
verify instrument in tests).  Nothing outside a pass edits the IR.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import time
from pathlib import Path
from typing import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from lowbit.errors import InternalError, LowbitError, PassFailure, PipelineError
from lowbit.passmanager.pipeline import Pipeline, PipelineItem, build_options, parse_pipeline
from lowbit.passmanager.properties import HOW, Prop

__all__ = [
    "Pass",
    "PassResult",
    "register_pass",
    "get_pass",
    "registered_passes",
    "CompileContext",
    "PassManager",
    "Instrument",
    "Prop",
    "CALIBRATED",
    "HESSIAN",
    "BITS_ASSIGNED",
    "FLOAT_EQUIVALENT",
    "QUANTIZED",
    "LOWERED_ORT",
    "add_default_instrument",
]

logger = logging.getLogger(__name__)

# IR properties a pass requires / ensures (see lowbit.passmanager.properties for their checkers).
CALIBRATED = Prop.CALIBRATED
HESSIAN = Prop.HESSIAN
QUANTIZED = Prop.QUANTIZED
BITS_ASSIGNED = Prop.BITS_ASSIGNED
LOWERED_ORT = Prop.LOWERED_ORT
FLOAT_EQUIVALENT = "float-equivalent"  # not a property: passes say it with ``float_equivalent = True``

# Factories of instruments every PassManager (and every pass called on its own) gets, e.g. the
# verify instrument under LOWBIT_VERIFY=1; a factory returns None to stay out.
_DEFAULT_INSTRUMENTS: list[Callable[[], "Instrument | None"]] = []


def add_default_instrument(factory: Callable[[], "Instrument | None"]) -> None:
    if factory not in _DEFAULT_INSTRUMENTS:
        _DEFAULT_INSTRUMENTS.append(factory)


def _with_defaults(instruments) -> list["Instrument"]:
    out = list(instruments)
    for factory in _DEFAULT_INSTRUMENTS:
        inst = factory()
        if inst is not None and not any(type(i) is type(inst) for i in out):
            out.append(inst)
    return out

_REGISTRY: dict[str, type["Pass"]] = {}


def register_pass(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"pass name '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type["Pass"]]:
    return dict(_REGISTRY)


def get_pass(name: str) -> type["Pass"]:
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known passes: {', '.join(sorted(_REGISTRY))}"
        raise PipelineError(f"unknown pass '{name}'", hint=hint)
    return _REGISTRY[name]


@dataclass
class CompileContext:
    """What passes share besides the IR: calibration feeds, probes, properties, the report."""

    calibration: list[dict[str, Any]] | None = None  # ORT feeds (name -> array)
    probes: list[dict[str, Any]] | None = None  # small inputs for equivalence checks
    properties: set[str] = field(default_factory=set)
    seed: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    # where a pass writes a file the user asked for (save=, lower-tvm): inside the run's artifact set when
    # there is one, so that it appears only if the whole compile succeeds (lowbit.ir.staging)
    stage: Any = field(default=Path)


class Pass(InPlacePass):
    """Base of lowbit passes.  Subclasses set ``Options``, properties and implement ``call``."""

    name: ClassVar[str] = "?"

    @dataclass(frozen=True)
    class Options:
        pass

    # Class attributes, or properties of the instance where they depend on the options
    # (e.g. quantize-weights requires XᵀX only with method=gptq).
    requires_properties: tuple[str, ...] = ()
    ensures_properties: tuple[str, ...] = ()
    invalidates_properties: tuple[str, ...] = ()
    float_equivalent: ClassVar[bool] = False
    _managed: bool = False  # set when a PassManager owns this pass (it calls the instruments itself)

    def __init__(self, options=None, ctx: CompileContext | None = None, given=()):
        self.options = options if options is not None else self.Options()
        self.ctx = ctx if ctx is not None else CompileContext()
        self.given = tuple(given)  # the options as written, for printing back
        self.stats: collections.Counter = collections.Counter()

    @classmethod
    def from_item(cls, item: PipelineItem, ctx: CompileContext) -> "Pass":
        return cls(build_options(item.name, cls.Options, item.options), ctx, item.options)

    @classmethod
    def may_ensure(cls) -> tuple[str, ...]:
        """Every property some configuration of this pass ensures (for the manager's hints)."""
        declared = inspect.getattr_static(cls, "ensures_properties")
        return tuple(cls().ensures_properties) if isinstance(declared, property) else tuple(declared or ())

    @property
    def item(self) -> PipelineItem:
        return PipelineItem(self.name, self.given)

    def __call__(self, model: ir.Model) -> PassResult:
        """Run the pass; called on its own (not by a manager), it still goes through the default instruments."""
        if self._managed:
            return _refuse_typeless(self, super().__call__(model))
        instruments = _with_defaults(())
        if not instruments:
            return _refuse_typeless(self, super().__call__(model))
        for inst in instruments:
            inst.before_pass(self, model)
        start = time.perf_counter()
        result = _refuse_typeless(self, super().__call__(model))
        for inst in instruments:
            inst.after_pass(self, result.model, result, time.perf_counter() - start)
        return result

    def fail(self, message: str, node: ir.Node | None = None, hint: str | None = None):
        raise PassFailure(self.name, message, node=None if node is None else (node.name or node.op_type), hint=hint)


def _refuse_typeless(p: Pass, result: PassResult) -> PassResult:
    """Refuse a pass that left a value typed as a tensor of unknown element type.

    Setting ``value.dtype = other.dtype`` where ``other`` is untyped (a model whose intermediate values
    carry no types: built by hand, or loaded without lowbit's frontend, which infers them) makes a
    ``Tensor(None)`` type that ONNX cannot serialize; the next session would fail deep inside onnx_ir
    with an unrelated pass's name on it.  This names the pass that made it, and what to do."""
    graph = result.model.graph
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            if v.type is not None and v.dtype is None:
                raise PassFailure(p.name, f"made value '{v.name}' a tensor of unknown element type "
                                          "(the model's values carry no types)", node=node.name or node.op_type,
                                  hint="load the model with lowbit.load_model or run 'canonicalize' first "
                                       "(both infer value types), or report this lowbit bug")
    return result


class Instrument:
    """Hooks the manager calls around each pass (timing, dumps, verification, reproducers)."""

    def before_pass(self, p: Pass, model: ir.Model) -> None: ...

    def after_pass(self, p: Pass, model: ir.Model, result: PassResult, seconds: float) -> None: ...

    def on_failure(self, p: Pass, model: ir.Model, exc: BaseException) -> None: ...

    def finish(self) -> None: ...


def _forget_removed_io(graph: ir.Graph) -> None:
    """Drop values that are no longer graph inputs/outputs from onnx-ir's reference counters.

    onnx-ir 1.1.0 counts each value's appearances in ``graph.inputs``/``graph.outputs`` in a Counter
    and keeps entries whose count fell to zero, so a value that was ever an input (shape inference
    appends every initializer to the inputs and removes it again) stays alive, weights and all,
    after a pass removed it: a model's worth of float weights leaked on every compile.
    """
    for io in (graph.inputs, graph.outputs):
        counter = getattr(io, "_ref_counter", None)
        if isinstance(counter, collections.Counter):
            for value in [v for v, n in counter.items() if n <= 0]:
                del counter[value]


class PassManager:
    """Runs passes in order, checking properties and calling instruments."""

    def __init__(self, passes: list[Pass], ctx: CompileContext, instruments=()):
        self.passes = list(passes)
        self.ctx = ctx
        self.instruments = _with_defaults(instruments)
        for p in self.passes:
            p._managed = True  # this manager calls the instruments around them

    @classmethod
    def from_pipeline(cls, pipeline: str | Pipeline, ctx: CompileContext, instruments=()) -> "PassManager":
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        passes = [get_pass(item.name).from_item(item, ctx) for item in pipeline]
        return cls(passes, ctx, instruments)

    @property
    def pipeline(self) -> Pipeline:
        return Pipeline(tuple(p.item for p in self.passes))

    def check_order(self) -> None:
        """Refuse a pipeline whose passes' requirements cannot be met, before running anything."""
        props = set(self.ctx.properties)
        for p in self.passes:
            missing = [str(r) for r in p.requires_properties if r not in props]
            if missing:
                providers = [n for n, c in _REGISTRY.items() if set(missing) & {str(x) for x in c.may_ensure()}]
                raise PipelineError(
                    f"pass '{p.name}' requires {missing} but no earlier pass in '{self.pipeline}' ensures it",
                    hint=f"put {' or '.join(repr(x) for x in providers) or 'a pass that ensures it'} before '{p.name}'"
                         + "".join(f" ({HOW[Prop(m)]})" for m in missing if Prop(m) in HOW),
                )
            props -= set(p.invalidates_properties)
            props |= set(p.ensures_properties)

    def run(self, model: ir.Model) -> ir.Model:
        self.check_order()
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, model)
            start = time.perf_counter()
            try:
                result = p(model)
            except BaseException as exc:
                for inst in self.instruments:
                    try:  # a failing instrument (a reproducer that cannot be written) never hides the real error
                        inst.on_failure(p, model, exc)
                    except Exception as inst_exc:  # noqa: BLE001
                        logger.error("%s could not record the failure of '%s': %s", type(inst).__name__, p.name,
                                     inst_exc)
                if isinstance(exc, (LowbitError, KeyboardInterrupt)) or not isinstance(exc, Exception):
                    raise
                if isinstance(exc, (MemoryError, OSError, UnicodeError)):
                    raise  # the API boundary turns these into user-facing errors naming the file
                raise InternalError(f"pass '{p.name}': internal error {type(exc).__name__}: {exc}",
                                    hint="this is a lowbit bug; re-run with --reproducer DIR and report it") from exc
            _forget_removed_io(result.model.graph)
            seconds = time.perf_counter() - start
            model = result.model
            self.ctx.properties -= set(p.invalidates_properties)
            self.ctx.properties |= set(p.ensures_properties)
            self.ctx.report.setdefault("passes", []).append(
                {"pass": str(p.item), "seconds": round(seconds, 4), "modified": bool(result.modified),
                 "stats": dict(p.stats)}
            )
            logger.info("%s: %.3fs %s", p.name, seconds, dict(p.stats))
            for inst in self.instruments:
                inst.after_pass(p, model, result, seconds)
        for inst in self.instruments:
            inst.finish()
        return model


def options_dict(p: Pass) -> dict[str, Any]:
    return dataclasses.asdict(p.options)
