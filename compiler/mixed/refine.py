"""Refining a mixed-precision plan: re-measure sensitivities around the plan, re-solve, keep what helps.

The integer program of :mod:`lowbit.mixed.bitplan` sums single-layer sensitivities measured around the
float model.  They do not add up: on stories260K the sum of the 36 single-layer ΔNLL at uniform
3-bit is 0.42, the model quantized whole loses 0.75, and layers interact unevenly, so the plan
that is optimal for the sum can lose to a uniform plan of the same size.  Refinement linearises
around the operating point instead (an iterated, trust-region integer program):

1. *Start* at the best, by joint calibration loss L, of the float-centred ILP plan and every
   uniform plan (one candidate for all layers) that fits the budget.
2. *Re-measure*: for the current plan P and every layer l and option o,
   ``Δ[l, o] = L(P with l at o) − L(P)`` — every other layer stays quantized as P says.
3. *Re-solve* the program with costs Δ (P's own options cost 0), allowing at most m layers to
   change.  Accept the new plan only if its joint loss, measured, is lower; otherwise halve m and
   re-solve with the same Δ.  A round ends on an accepted plan; refinement stops when m = 1 fails.

Every accepted step lowers the measured joint loss on the calibration samples, so the result is
never worse there than the best uniform plan that fits the budget.  Weights are simulated with
the quantizer that will materialise them (RTN, or GPTQ: ``quantizer``).  Options that the
float-centred costs already show to be dominated within their layer (another option no larger in
the budgeted resource and no more damaging) are not re-measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np

from lowbit.mixed.bitplan import Option, Unit, solve
from lowbit.quant.rtn import FLOAT_BITS
from lowbit.mixed.sensitivity import quantizer_tag, simulated_weight

__all__ = ["Refinement", "refine", "prune_dominated"]

Choice = tuple[int, int]  # (bits, group)


@dataclass
class Refinement:
    assignment: dict[str, Choice]
    loss: float
    start: str
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"start": self.start, "loss": self.loss, "steps": self.history}


def prune_dominated(options: list[Option], resource: str, keep: Choice | None = None) -> list[Option]:
    """Options not dominated within their layer by (resource used, cost); ``keep`` always stays."""
    out = []
    for i, o in enumerate(options):
        r, c = getattr(o, resource), o.cost
        dominated = any((getattr(p, resource) <= r and p.cost <= c and (getattr(p, resource) < r or p.cost < c))
                        or (j < i and getattr(p, resource) == r and p.cost == c)
                        for j, p in enumerate(options) if p is not o)
        if not dominated or (o.bits, o.group) == keep:
            out.append(o)
    return out


def _digest(assignment: dict[str, Choice]) -> str:
    return hashlib.sha256(json.dumps(sorted(assignment.items())).encode()).hexdigest()[:16]


class _Joint:
    """Joint calibration loss of whole assignments, fake-quantized weights and results memoised."""

    def __init__(self, probe, linears, metric: str, cache=None, quantizer: str = "rtn"):
        self.probe, self.metric, self.cache, self.quantizer = probe, metric, cache, quantizer
        self.linears = {lin.name: lin for lin in linears}
        self.wname = {lin.name: lin.weight.name for lin in linears}
        self._fq: dict[tuple[str, int, int], np.ndarray] = {}
        self.probes = 0

    def fq(self, name: str, choice: Choice) -> np.ndarray:
        key = (name, *choice)
        if key not in self._fq:
            self._fq[key] = simulated_weight(self.linears[name], *choice, self.quantizer)
        return self._fq[key]

    def loss(self, assignment: dict[str, Choice]) -> float:
        tag = f"{self.metric}{quantizer_tag(self.quantizer)}@{_digest(assignment)}"
        if self.cache is not None and (hit := self.cache.get("plan", 0, 0, tag)) is not None:
            return hit
        overrides = {self.wname[n]: self.fq(n, c) for n, c in assignment.items() if c[0] < FLOAT_BITS}
        value = self.probe.losses(overrides)[self.metric]
        self.probes += 1
        if self.cache is not None:
            self.cache.put(value, "plan", 0, 0, tag)
        return value


def refine(probe, linears, options: dict[str, list[Option]], starts: dict[str, dict[str, Choice]], capacity: float,
           resource: str, metric: str, rounds: int, cache=None, progress: bool = True,
           same_metric: bool = False, quantizer: str = "rtn") -> Refinement:
    """Iterated trust-region ILP around the best start (see the module doc).

    ``options[layer]`` carry float-centred costs, used only to prune: dominated options are not
    re-measured, and when those costs are in the refinement's own metric (``same_metric``), neither
    is an option whose damage alone, from float, exceeds the whole current plan's.
    """
    from tqdm.auto import tqdm

    joint = _Joint(probe, linears, metric, cache, quantizer)
    names = [lin.name for lin in linears]
    scored = {label: joint.loss(a) for label, a in starts.items()}
    start = min(scored, key=scored.get)
    current, loss = dict(starts[start]), scored[start]
    result = Refinement(current, loss, start, [{"starts": dict(scored)}])
    for r in range(rounds):
        ceiling = loss - probe.base[metric] if same_metric else np.inf
        kept = {n: [o for o in prune_dominated(options[n], resource, keep=current[n])
                    if o.cost <= ceiling or (o.bits, o.group) == current[n]] for n in names}
        jobs = [(n, o) for n in names for o in kept[n] if (o.bits, o.group) != current[n]]
        delta = {(n, o.bits, o.group): joint.loss({**current, n: (o.bits, o.group)}) - loss
                 for n, o in tqdm(jobs, desc=f"refine round {r + 1}", unit="probe", disable=not progress)}
        if cache is not None:
            cache.save()
        units, base_idx = [], []
        for lin in linears:
            opts = [replace(o, cost=delta.get((lin.name, o.bits, o.group), 0.0)) for o in kept[lin.name]]
            units.append(Unit(lin.name, lin.shape, None, opts))
            base_idx.append(next(i for i, o in enumerate(opts) if (o.bits, o.group) == current[lin.name]))
        m, accepted = len(names), False
        while m >= 1:
            chosen = solve(units, capacity, resource, base=base_idx, max_changes=m)
            cand = {n: (o.bits, o.group) for n, o in zip(names, chosen)}
            changes = sum(cand[n] != current[n] for n in names)
            if changes == 0:
                break
            new = joint.loss(cand)
            step = {"round": r + 1, "max_changes": m, "changes": changes, "predicted": round(sum(o.cost for o in chosen), 6),
                    "loss": new, "accepted": new < loss}
            result.history.append(step)
            if new < loss:
                current, loss, accepted = cand, new, True
                break
            m = min(m, changes) // 2
        if not accepted:
            break
    if cache is not None:
        cache.save()
    result.assignment, result.loss = current, loss
    result.history.append({"probes": joint.probes})
    return result
