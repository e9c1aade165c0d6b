"""Mixed-precision plans: per-layer (and per output-column group) bit widths, chosen by an integer program.

A *unit* is a linear layer.  Each unit u has options o = (bits, group) with cost ``c[u,o]``
(sensitivity), size ``b[u,o]`` (bytes in the written file, :func:`lowbit.quant.rtn.storage_bytes`) and
optionally latency ``t[u,o]``.  With MixLLM-style splitting, a layer also has *split options*: its
``split`` fraction of most sensitive output columns at a finer (bits, group) than the rest, the
two parts run as two kernels whose outputs an int32 column order puts back in place — so a split
option costs both parts' bytes plus ``4·N`` (:func:`split_bytes`), and the solver splits a layer
only where that pays.  The program, solved exactly by HiGHS through ``scipy.optimize.milp``::

    minimise Σ c[u,o]·x[u,o]   s.t.  Σ_o x[u,o] = 1 for every u,   Σ b[u,o]·x[u,o] ≤ B,   x ∈ {0,1}

Sensitivities are additive over layers (the usual assumption of HAWQ-style programs) and, within
a layer, over output columns (exact for the cheap estimator; the measured one is shared out in
proportion to the cheap per-column values).  :mod:`lowbit.mixed.refine` corrects the first assumption
by re-measuring around the plan.

A :class:`Plan` is plain JSON: it can be saved, edited by hand and replayed.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.mixed.forms import FORM_BYTES  # re-exported: the MatMulNBits form's graph bytes
from lowbit.quant.rtn import FLOAT_BITS, fake_quant, storage_bytes

__all__ = ["Option", "Unit", "LayerPlan", "Plan", "solve", "nominal_width", "apply_fake_quant", "fake_quant_proto", "plan_bytes",
           "split_bytes", "graph_overhead", "function_bytes", "FORM_BYTES",
           "PLAN_VERSION", "ORDER_BYTES"]

PLAN_VERSION = 1
ORDER_BYTES = 4  # a split layer's column order is int32


@dataclass(frozen=True)
class Option:
    bits: int
    group: int
    bytes: int
    cost: float
    latency: float = 0.0
    nominal: int = 0  # bits × weights (scales and zero points not counted)
    split: tuple[int, int] | None = None  # (bits, group) of the unit's salient columns; bits/group: the rest


@dataclass
class Unit:
    layer: str
    shape: tuple[int, int]  # [K, N] of the whole layer
    columns: np.ndarray | None  # the salient output columns that split options quantize apart (None: no split)
    options: list[Option]


@dataclass
class LayerPlan:
    name: str
    shape: list[int]
    bits: int
    group: int
    bytes: int
    est_error: float | None = None  # cheap estimate of the chosen option
    measured_error: float | None = None  # measured ΔNLL (or KL) of the chosen option, if measured
    split: dict | None = None  # {"columns": [...], "bits": b, "group": g, "bytes": n} for the salient columns

    def describe(self) -> str:
        text = f"{self.bits}b/g{self.group}" if self.bits < FLOAT_BITS else "float"
        if self.split:
            s = self.split
            cols = len(s["columns"])
            text += f" + {cols} cols {s['bits']}b/g{s['group']}" if s["bits"] < FLOAT_BITS else f" + {cols} float cols"
        return text


@dataclass
class Plan:
    layers: list[LayerPlan]
    budget: str = "avg_bits"
    target: float = 0.0
    estimator: str = "cheap"
    fixed_bytes: int = 0  # initializers that are not linear weights (embedding, norms, tables)
    graph_bytes: int = 0  # the rest of the written file: nodes, names, tensor headers (see graph_overhead)
    model: str = ""  # fingerprint of the model the plan was made for
    extra: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def weights(self) -> int:
        return sum(lp.shape[0] * lp.shape[1] for lp in self.layers)

    @property
    def linear_bytes(self) -> int:
        return sum(lp.bytes + (lp.split["bytes"] if lp.split else 0) for lp in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.linear_bytes

    @property
    def file_bytes(self) -> int:
        """The predicted size of the written ``.onnx`` file: initializers plus the serialized graph."""
        return self.total_bytes + self.graph_bytes

    @property
    def avg_bits(self) -> float:
        """Stored bits per linear weight: weights, scales and zero points, as the file holds them."""
        return 8.0 * self.linear_bytes / max(self.weights, 1)

    @property
    def nominal_bits(self) -> float:
        """Σ bits × weights / weights: the papers' average bit width (scales not counted; float = 32)."""
        total = 0
        for lp in self.layers:
            k, n = lp.shape
            ns = len(lp.split["columns"]) if lp.split else 0
            total += k * (n - ns) * nominal_width(lp.bits) + (k * ns * nominal_width(lp.split["bits"]) if ns else 0)
        return total / max(self.weights, 1)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {"weights": self.weights, "linear_bytes": self.linear_bytes, "total_bytes": self.total_bytes,
                        "file_bytes": self.file_bytes,
                        "avg_bits": round(self.avg_bits, 4), "nominal_bits": round(self.nominal_bits, 4)}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "Plan":
        from lowbit.mixed.plan_schema import check_plan_dict

        check_plan_dict(d, source)  # missing keys / wrong types are refused naming the key
        d = dict(d)
        d.pop("summary", None)
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise LowbitError(f"plan version {d.get('version')} is not supported (this lowbit reads {PLAN_VERSION})")
        layers = [LayerPlan(**lp) for lp in d.pop("layers")]
        return cls(layers=layers, **d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from lowbit.files import read_bytes

        data = read_bytes(path, "plan")  # regular files only, bounded
        try:
            return cls.from_dict(json.loads(data.decode("utf-8")), str(path))
        except LowbitError:
            raise
        except (ValueError, TypeError) as exc:
            raise LowbitError(f"{path}: not a readable lowbit plan ({exc})",
                              hint="plans are JSON written by assign-bits{save=PATH} or 'lowbit report'") from exc

    def refresh_bytes(self) -> None:
        """Recompute every byte count from bits/group/shape (after a hand edit); a plan made with
        ``quantizer=gptq-mod:SCALES`` counts its 2/3-bit layers in the grid form."""
        from lowbit.quant.mod import mod_storage_bytes

        quantizer = str(self.extra.get("quantizer", ""))
        grid = quantizer.startswith("gptq-mod")
        for lp in self.layers:
            k, n = lp.shape
            ns = len(lp.split["columns"]) if lp.split else 0
            if grid and lp.bits in (2, 3) and not ns:
                lp.bytes = mod_storage_bytes(k, n, lp.bits, lp.group, scale_dtype=quantizer.partition(":")[2] or "float32")
                continue
            lp.bytes = storage_bytes(k, n - ns, lp.bits, lp.group)
            if lp.split:
                lp.split["bytes"] = split_bytes(k, n, ns, lp.split["bits"], lp.split["group"])




def graph_overhead(model) -> int:
    """Bytes of ``model``'s serialized protobuf that are not initializer data (nodes, names, value infos,
    tensor headers, metadata); external data counts as nothing here, as it is not in the ``.onnx`` file."""
    import onnx_ir as ir

    proto = ir.to_proto(model)
    return proto.ByteSize() - sum(len(t.raw_data) for t in proto.graph.initializer)


def function_bytes(op_type: str, opset: int = 21) -> int:
    """Serialized size of a lowbit op's function body, which a model using the op carries once."""
    from lowbit.ops.registry import get_op

    return get_op(op_type).function(opset).ByteSize()


def split_bytes(k: int, n: int, ns: int, bits: int, group: int) -> int:
    """Bytes a split layer adds for its ``ns`` salient columns of ``[K, N]``: their own storage plus
    the int32 column order (``N`` entries) that puts the two parts' outputs back in place."""
    return storage_bytes(k, ns, bits, group) + ORDER_BYTES * n


def nominal_width(bits: int) -> int:
    return 32 if bits >= FLOAT_BITS else bits


@contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at 2 for the duration (output of native code included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:  # flush C stdio buffers while fd 1 still points at stderr
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError, TypeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def solve(units: list[Unit], capacity: float, resource: str = "bytes", base: list[int] | None = None,
          max_changes: int | None = None) -> list[Option]:
    """The exact optimum of the program above; ``resource`` is the Option field the budget bounds.

    With ``base`` (one option index per unit) and ``max_changes``, at most that many units may
    leave their base option (a trust region: ``Σ_u Σ_{o ≠ base_u} x[u,o] ≤ max_changes``).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(u.options) for u in units]
    n = sum(sizes)
    cost = np.array([o.cost for u in units for o in u.options], np.float64)
    use = np.array([getattr(o, resource) for u in units for o in u.options], np.float64)
    lowest = sum(min(getattr(o, resource) for o in u.options) for u in units)
    if lowest > capacity:
        raise LowbitError(f"budget {capacity:g} ({resource}) is below the smallest possible plan ({lowest:g})",
                          hint="raise the target, or allow fewer bits / larger groups")
    scale = float(np.abs(cost).max()) if cost.size and np.abs(cost).max() > 0 else 1.0
    onehot = np.zeros((len(units), n))
    start = 0
    for i, s in enumerate(sizes):
        onehot[i, start : start + s] = 1.0
        start += s
    constraints = [LinearConstraint(onehot, 1, 1), LinearConstraint(use[None, :], -np.inf, capacity)]
    if base is not None and max_changes is not None:
        moved = np.ones(n)
        moved[np.cumsum([0] + sizes[:-1]) + np.asarray(base)] = 0.0
        constraints.append(LinearConstraint(moved[None, :], -np.inf, max_changes))
    with _stdout_to_stderr():  # HiGHS' C++ code sometimes prints debug lines; keep `--json` stdout clean
        res = milp(cost / scale, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "presolve": True})
    if res.x is None:
        raise LowbitError(f"the integer program found no plan: {res.message}")
    x = np.round(res.x).astype(int)
    chosen, start = [], 0
    for s, u in zip(sizes, units):
        k = int(np.argmax(x[start : start + s]))
        chosen.append(u.options[k])
        start += s
    if sum(getattr(o, resource) for o in chosen) > capacity:  # guard: integrality must hold exactly
        raise LowbitError("the solver returned a plan over budget (numerical trouble)")
    return chosen


def apply_fake_quant(weights: dict[str, np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    """The dequantized weight of every planned layer (``weights``: layer name -> W[K, N])."""
    out = {}
    for lp in plan.layers:
        w = np.asarray(weights[lp.name], np.float32)
        wq = fake_quant(w, lp.bits, lp.group)
        if lp.split:
            cols = np.asarray(lp.split["columns"], np.int64)
            wq[:, cols] = fake_quant(w[:, cols], lp.split["bits"], lp.split["group"])
        out[lp.name] = wq
    return out


def fake_quant_proto(model, plan: Plan):
    """A ModelProto of ``model`` with every planned linear's weight replaced by its dequantized value:
    what the weight-only quantized model computes, up to float rounding order."""
    from onnx import numpy_helper

    from lowbit.ir.analysis import find_linears
    from lowbit.ir.sessions import to_proto

    lins = find_linears(model.graph)
    deq = apply_fake_quant({lin.name: lin.weight.const_value.numpy() for lin in lins}, plan)
    names = {lin.weight.name: lin.name for lin in lins}
    proto = to_proto(model)
    for t in proto.graph.initializer:
        if t.name in names:
            t.CopyFrom(numpy_helper.from_array(deq[names[t.name]], t.name))
    return proto


def plan_bytes(plan: Plan, weights: dict[str, np.ndarray]) -> int:
    """Bytes of the packed arrays the written file holds for the plan's linears (real buffers)."""
    from lowbit.quant.rtn import pack

    total = 0
    for lp in plan.layers:
        w = np.asarray(weights[lp.name], np.float32)
        cols = np.asarray(lp.split["columns"], np.int64) if lp.split else np.zeros(0, np.int64)
        rest = np.setdiff1d(np.arange(w.shape[1]), cols)
        total += sum(a.nbytes for a in pack(w[:, rest], lp.bits, lp.group).values())
        if lp.split:
            total += sum(a.nbytes for a in pack(w[:, cols], lp.split["bits"], lp.split["group"]).values())
            total += np.zeros(w.shape[1], np.int32).nbytes  # the column order the materialiser writes
    return total
