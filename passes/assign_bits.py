"""Mixed-precision assignment: choose each linear's weight bit width by an integer program.

Decide, then materialise: this pass only writes annotations; ``quantize-weights`` honours them.
The algebra it relies on is in :mod:`lowbit.mixed.bitplan` (one-hot binaries per layer or column group,
a knapsack budget, summed sensitivity minimised exactly by HiGHS) and :mod:`lowbit.mixed.sensitivity`.

Annotation contract, on each linear's ``MatMul`` node (``node.metadata_props``):

* ``lowbit.bits``  — ``"2" | "3" | "4" | "8" | "16"`` (16: keep the float weight);
* ``lowbit.group`` — ``"32" | "64" | "128" | "0"``: group length along K (0: one group per column);
* ``lowbit.bits_split`` (only when a layer is split, MixLLM-style) — JSON
  ``{"columns": [n, ...], "bits": b, "group": g}``: these output columns of W[K, N] are quantized
  at ``b``/``g``; all other columns at ``lowbit.bits``/``lowbit.group``.  A materialiser
  splits the layer into two column groups (two MatMulNBits + Concat and a column permutation, or
  one op with per-column bits).  A quantizer that ignores the key quantizes the whole layer at
  ``lowbit.bits`` — valid, but no longer the plan the budget was checked for.

Budgets (``target``): ``avg_bits`` — stored bits (weights, scales and zero points) per linear
weight; ``nominal_bits`` — Σ bits × weights / weights, scales not counted (the papers' "W3.5"; the
solver then takes the smallest candidate group, so restrict ``groups`` to compare like with
like); ``bytes`` — the whole written ``.onnx`` file: initializers (linears in the storage format of
:func:`lowbit.quant.rtn.storage_bytes`, everything else as it is now — so run ``quantize-embeddings``
first) plus the serialized graph, measured on the model as it is (:func:`lowbit.mixed.bitplan.graph_overhead`)
with ``FORM_BYTES`` for each quantized linear's node and tensor headers (``plan.file_bytes``);
``latency`` — summed µs of the
linears from a backend's latency table (``table=ort-cpu``).  ``plan=PATH`` replays a saved (and
possibly hand-edited) plan instead of solving; ``save=PATH`` writes the plan.

``refine=N`` (whole layers only) then re-measures sensitivities around the plan with every other
layer quantized, re-solves under a trust region and keeps a new plan only when its measured joint
loss on the calibration samples is lower (:mod:`lowbit.mixed.refine`); it starts from the best of the
solved plan and every uniform plan that fits, so it is never worse than those on that loss.
About N × (layers × options) model runs: minutes on stories260K.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lowbit.ir.analysis import find_linears
from lowbit.mixed.forms import WriteForm
from lowbit.mixed.bitplan import (FORM_BYTES, LayerPlan, Option, Plan, Unit, function_bytes, graph_overhead,
                                  nominal_width, solve, split_bytes)
from lowbit.mixed.latency import LatencyTable
from lowbit.passmanager.manager import BITS_ASSIGNED, HESSIAN, Pass, PassResult, register_pass
from lowbit.quant.rtn import FLOAT_BITS, storage_bytes
from lowbit.mixed.sensitivity import cheap_per_column, hessian_diag, measured_sensitivity, model_fingerprint

__all__ = ["AssignBits", "annotate", "BITS_KEY", "GROUP_KEY", "SPLIT_KEY"]

BITS_KEY, GROUP_KEY, SPLIT_KEY = "lowbit.bits", "lowbit.group", "lowbit.bits_split"


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in str(text).split(":") if t)
    except ValueError:
        raise ValueError(f"assign-bits: {what} must be integers separated by ':', got '{text}'") from None


def annotate(linears, plan: Plan) -> None:
    import json

    by_name = {lin.name: lin for lin in linears}
    for lp in plan.layers:
        md = by_name[lp.name].node.metadata_props
        md[BITS_KEY], md[GROUP_KEY] = str(lp.bits), str(lp.group)
        if lp.split:
            md[SPLIT_KEY] = json.dumps({k: lp.split[k] for k in ("columns", "bits", "group")})
        else:
            md.pop(SPLIT_KEY, None)


@register_pass("assign-bits")
class AssignBits(Pass):
    """Annotate every linear with the bits (and group) chosen by an integer program."""

    @dataclass(frozen=True)
    class Options:
        budget: Literal["avg_bits", "nominal_bits", "bytes", "latency"] = "avg_bits"
        target: float = 3.0
        estimator: Literal["cheap", "measured", "measured-kl"] = "cheap"
        bits: str = "2:3:4:8"  # candidate widths; add 16 to allow keeping a layer in float
        groups: str = "32:64:128"  # candidate group lengths (0: per-channel)
        split: float = 0.0  # fraction of output columns that may take other bits (0: whole layers)
        plan: str = ""  # replay this plan instead of solving
        save: str = ""  # write the plan here
        table: str = "ort-cpu"  # latency table (built-in name or path)
        samples: int = 0  # calibration samples for the measured estimator (0: all)
        cache: str = ""  # sensitivity cache folder (default $LOWBIT_CACHE or ~/.cache/lowbit)
        refine: int = 0  # rounds of re-measuring around the plan and re-solving (lowbit.mixed.refine; 0: off)
        quantizer: Literal["rtn", "gptq", "gptq-mod"] = "rtn"  # how measured probes simulate the weights: match
        # quantize-weights (gptq-mod: 2/3-bit layers as its dtype=mod,hessian_fit=true,clip_search=true grids)
        scale_dtype: Literal["float32", "float16", "uint8"] = "float32"  # gptq-mod: the 2/3-bit layers' scale storage
        ray: str = ""  # run the measured sweep on Ray workers: 'auto' or a cluster address ('' = here)

        def __post_init__(self):
            bits, groups = _ints(self.bits, "bits"), _ints(self.groups, "groups")
            if not bits or any(b not in (2, 3, 4, 8, 16) for b in bits):
                raise ValueError(f"assign-bits: bits must be among 2:3:4:8:16, got '{self.bits}'")
            low = 8 if self.quantizer == "gptq-mod" else 16
            if not groups or any(g < 0 or (g and g & (g - 1)) or 0 < g < low for g in groups):
                raise ValueError(f"assign-bits: groups must be 0 or powers of two >= 16 (>= 8 with quantizer=gptq-mod), "
                                 f"got '{self.groups}'")
            if not 0 <= self.split < 1:
                raise ValueError(f"assign-bits: split must be in [0, 1), got {self.split}")
            if self.target <= 0:
                raise ValueError(f"assign-bits: target must be positive, got {self.target}")
            if not 0 <= self.refine <= 100:
                raise ValueError(f"assign-bits: refine must be in [0, 100] rounds, got {self.refine}")
            if self.samples < 0:
                raise ValueError(f"assign-bits: samples must be >= 0 (0: all), got {self.samples}")
            if self.quantizer not in ("rtn", "gptq", "gptq-mod"):
                raise ValueError(f"assign-bits: quantizer must be rtn, gptq or gptq-mod, got '{self.quantizer}'")
            if self.scale_dtype not in ("float32", "float16", "uint8"):
                raise ValueError(f"assign-bits: scale_dtype must be float32, float16 or uint8, got '{self.scale_dtype}'")
            if self.quantizer == "gptq-mod" and (self.split or self.budget == "latency"):
                raise ValueError("assign-bits: quantizer=gptq-mod plans whole layers under budget=avg_bits, "
                                 "nominal_bits or bytes (split and the latency tables are integer forms)")
            if self.refine and self.split:
                raise ValueError("assign-bits: refine works on whole layers; use split=0 with refine")

    ensures_properties = (BITS_ASSIGNED,)

    @property
    def requires_properties(self):
        return () if self.options.plan else (HESSIAN,)  # sensitivity reads XᵀX; a replayed plan does not

    def call(self, model):
        linears = find_linears(model.graph)
        if not linears:
            self.fail("the model has no linear layers (MatMul with a constant 2-D weight)")
        weights = {lin.weight.name for lin in linears}
        fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items()
                    if n not in weights and v.const_value is not None)
        self._graph = graph_overhead(model)
        if self.options.plan:
            plan = self._replay(linears, fixed)
        else:
            plan = self._solve(model, linears, fixed)
        plan.graph_bytes = self._graph + sum(self._write.graph_bytes(lp.bits) * (lp.bits < FLOAT_BITS)
                                             + 2 * FORM_BYTES * bool(lp.split) for lp in plan.layers)
        if any(3 in (lp.bits, (lp.split or {}).get("bits")) and not self._write.grid(lp.bits)
               for lp in plan.layers):  # lowbit.MatMul3Bit's body
            plan.graph_bytes += function_bytes("MatMul3Bit", max(model.opset_imports.get("", 21), 21))
        plan.graph_bytes += self._write.once_bytes({lp.bits for lp in plan.layers})
        before = [dict(lin.node.metadata_props) for lin in linears]
        annotate(linears, plan)
        changed = before != [dict(lin.node.metadata_props) for lin in linears]  # a replayed plan may change nothing
        if self.options.save:
            plan.save(self.ctx.stage(self.options.save))
        self.ctx.report["assign-bits"] = {"plan": plan.to_dict(), "linear_bytes": plan.linear_bytes,
                                          "total_bytes": plan.total_bytes, "file_bytes": plan.file_bytes,
                                          "avg_bits": plan.avg_bits,
                                          "nominal_bits": plan.nominal_bits}
        self.stats["layers"] = len(plan.layers)
        self.stats["split_layers"] = sum(1 for lp in plan.layers if lp.split)
        for lp in plan.layers:
            self.stats[f"{lp.bits}-bit"] += 1
        return PassResult(model, modified=changed)

    def _replay(self, linears, fixed: int) -> Plan:
        plan = Plan.load(self.options.plan)
        by_name = {lin.name: lin for lin in linears}
        names = {lp.name for lp in plan.layers}
        missing = [n for n in by_name if n not in names]
        if missing:
            self.fail(f"plan {self.options.plan} has no entry for {len(missing)} linears, e.g. '{missing[0]}'",
                      hint="re-run assign-bits on this model, or add the layers to the plan")
        for lp in plan.layers:
            lin = by_name.get(lp.name)
            if lin is None:
                self.fail(f"plan layer '{lp.name}' is not a linear of this model")
            if tuple(lp.shape) != lin.shape:
                self.fail(f"plan layer '{lp.name}' has shape {lp.shape}, the model's weight is {list(lin.shape)}",
                          node=lin.node)
            for b, g in [(lp.bits, lp.group)] + ([(lp.split["bits"], lp.split["group"])] if lp.split else []):
                if b not in (2, 3, 4, 8, 16) or g < 0:
                    self.fail(f"plan layer '{lp.name}': bits {b} / group {g} is not a valid choice", node=lin.node)
        plan.fixed_bytes = fixed
        plan.refresh_bytes()
        return plan

    def _solve(self, model, linears, fixed: int) -> Plan:
        o = self.options
        bits, groups = _ints(o.bits, "bits"), _ints(o.groups, "groups")
        table = LatencyTable.load(o.table) if o.budget == "latency" else None
        choices, hdiags = {}, {}
        for lin in linears:  # distinct (bits, effective group) per layer
            k = lin.shape[0]
            eff = sorted({(b, 0 if (g == 0 or g >= k) else g)
                          for b in bits for g in (groups if b < FLOAT_BITS else (0,))
                          if g == 0 or g >= 16 or (b in (2, 3) and o.quantizer == "gptq-mod")})
            choices[lin.name] = eff
            hdiags[lin.name] = hessian_diag(lin)
        cols = {(lin.name, b, g): cheap_per_column(lin, b, g, hdiags[lin.name])
                for lin in linears for b, g in choices[lin.name]}
        layer_cost = {key: float(v.sum()) for key, v in cols.items()}
        measured = None
        if o.estimator != "cheap":
            feeds = (self.ctx.calibration or [])[: o.samples or None]
            from lowbit.data.datasets import model_kind

            measured = measured_sensitivity(
                model, [(lin, b, g) for lin in linears for b, g in choices[lin.name]], feeds, kind=model_kind(model),
                metric="kl" if o.estimator == "measured-kl" else "nll", cache_dir=o.cache or None,
                quantizer=self._write.probe, progress=self.ctx.show_progress, ray=o.ray)
            layer_cost = _monotone(measured, choices)
        units = []
        for lin in linears:
            k, n = lin.shape
            ns = int(round(o.split * n)) if o.split > 0 else 0
            extra = o.budget == "bytes"
            form = self._write
            opts = [Option(b, g, form.stored_bytes(k, n, b, g)
                           + extra * (form.graph_bytes(b) - FORM_BYTES) * (b < FLOAT_BITS),
                           layer_cost[(lin.name, b, g)],
                           table.us(k, n, b) if table else 0.0, k * n * nominal_width(b))
                    for b, g in choices[lin.name]]
            salient = None
            if 1 <= ns < n:  # MixLLM: the ns most sensitive output columns may take finer options than the rest
                b0, g0 = min(choices[lin.name])
                salient = np.sort(np.argsort(-cols[(lin.name, b0, g0)], kind="stable")[:ns])
                rest = np.setdiff1d(np.arange(n), salient)
                for (bs, gs), (br, gr) in itertools.permutations(choices[lin.name], 2):
                    if not _finer((bs, gs), (br, gr)):
                        continue
                    cs, cr = cols[(lin.name, bs, gs)], cols[(lin.name, br, gr)]
                    share_s = cs[salient].sum() / cs.sum() if cs.sum() > 0 else ns / n
                    share_r = cr[rest].sum() / cr.sum() if cr.sum() > 0 else (n - ns) / n
                    opts.append(Option(br, gr, storage_bytes(k, n - ns, br, gr) + split_bytes(k, n, ns, bs, gs),
                                       layer_cost[(lin.name, bs, gs)] * share_s + layer_cost[(lin.name, br, gr)] * share_r,
                                       (table.us(k, n - ns, br) + table.us(k, ns, bs)) if table else 0.0,
                                       k * (n - ns) * nominal_width(br) + k * ns * nominal_width(bs), split=(bs, gs)))
            units.append(Unit(lin.name, (k, n), salient, opts))
        weights_total = sum(lin.shape[0] * lin.shape[1] for lin in linears)
        capacity, resource = {"avg_bits": (o.target * weights_total / 8.0, "bytes"),
                              "nominal_bits": (o.target * weights_total, "nominal"),
                              "bytes": (o.target - fixed - self._graph - FORM_BYTES * len(linears)
                                        - (function_bytes("MatMul3Bit") if 3 in bits and not self._write.grid(3) else 0)
                                        - self._write.once_bytes(bits), "bytes"),
                              "latency": (o.target, "latency")}[o.budget]
        chosen = solve(units, capacity, resource)
        plan = Plan([], budget=o.budget, target=o.target, estimator=o.estimator, fixed_bytes=fixed,
                    model=model_fingerprint(model),
                    extra={"split": o.split, "groups": o.groups, "bits": o.bits, "quantizer": self._write.probe})
        if o.refine:
            chosen = self._refine(model, linears, units, chosen, choices, capacity, resource, plan)
        for lin, u, opt in zip(linears, units, chosen):
            plan.layers.append(_layer_plan(lin, u, opt, cols, measured))
            if not opt.split:  # the stored bytes (the solver's bytes may hold the form's graph bytes too)
                plan.layers[-1].bytes = self._write.stored_bytes(*lin.shape, opt.bits, opt.group)
        if table is not None:
            plan.extra["latency_us"] = round(sum(opt.latency for opt in chosen), 2)
        return plan

    @property
    def _write(self) -> WriteForm:
        return WriteForm(self.options.quantizer, self.options.scale_dtype)

    def _refine(self, model, linears, units, chosen, choices, capacity, resource, plan) -> list[Option]:
        """Re-measure around the plan and re-solve (:mod:`lowbit.mixed.refine`); returns one option per layer."""
        from lowbit.data.datasets import model_kind
        from lowbit.mixed.refine import refine
        from lowbit.mixed.sensitivity import LossProbe, SensitivityCache, feeds_fingerprint

        o = self.options
        feeds = (self.ctx.calibration or [])[: o.samples or None]
        if not feeds:
            self.fail("refine measures the model's loss and needs calibration samples",
                      hint="pass --calibration, or set refine=0")
        kind = model_kind(model)
        metric = "cos" if kind == "encoder" else ("kl" if o.estimator == "measured-kl" else "nll")
        options = {u.layer: u.options for u in units}
        starts = {"ilp": {u.layer: (c.bits, c.group) for u, c in zip(units, chosen)}}
        candidates = sorted({(b, g) for opts in choices.values() for b, g in opts})
        for b, g in candidates:  # one choice for every layer (groups longer than K mean per-channel)
            pick = {u.layer: next((c for c in u.options if c.bits == b and c.group == (0 if g >= u.shape[0] else g)),
                                  None) for u in units}
            if None not in pick.values() and sum(getattr(c, resource) for c in pick.values()) <= capacity:
                starts[f"uniform {b}b g{g}"] = {n: (c.bits, c.group) for n, c in pick.items()}
        cache = SensitivityCache(o.cache or None, model_fingerprint(model), feeds_fingerprint(feeds))
        probe = LossProbe(model, feeds, [lin.weight.name for lin in linears], kind)
        result = refine(probe, linears, options, starts, capacity, resource, metric, o.refine, cache=cache,
                        progress=self.ctx.show_progress,
                        same_metric={"measured": "nll", "measured-kl": "kl"}.get(o.estimator) == metric,
                        quantizer=self._write.probe)
        plan.extra["refine"] = {"metric": metric, **result.to_dict()}
        self.stats["refine-steps"] = sum(1 for h in result.history if h.get("accepted"))
        return [next(c for c in u.options if (c.bits, c.group) == result.assignment[u.layer]) for u in units]


def _monotone(measured: dict, choices: dict) -> dict:
    """Measured cost, clamped at 0 and made non-increasing in bits within each group (noise guard)."""
    out = {}
    for name, opts in choices.items():
        for g in {g for _, g in opts}:
            run = 0.0
            for b in sorted((b for b, gg in opts if gg == g), reverse=True):
                run = max(run, measured[(name, b, g)], 0.0)
                out[(name, b, g)] = run
    # float (16) may sit in group 0 while others use g > 0: nothing to carry across groups
    return out


def _finer(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Option a is more precise than b: more bits, or as many bits in shorter groups (0 = whole column)."""
    (ba, ga), (bb, gb) = a, b
    return nominal_width(ba) > nominal_width(bb) or (ba == bb and (ga or 1 << 30) < (gb or 1 << 30))


def _layer_plan(lin, unit, opt, cols, measured) -> LayerPlan:
    k, n = lin.shape
    if opt.split is None:
        key = (lin.name, opt.bits, opt.group)
        return LayerPlan(lin.name, [k, n], opt.bits, opt.group, opt.bytes, float(cols[key].sum()),
                         None if measured is None else measured[key])
    (bs, gs), sal = opt.split, unit.columns
    rest = np.setdiff1d(np.arange(n), sal)
    est = float(cols[(lin.name, bs, gs)][sal].sum() + cols[(lin.name, opt.bits, opt.group)][rest].sum())
    split = {"columns": [int(c) for c in sal], "bits": bs, "group": gs, "bytes": split_bytes(k, n, len(sal), bs, gs)}
    return LayerPlan(lin.name, [k, n], opt.bits, opt.group, storage_bytes(k, n - len(sal), opt.bits, opt.group), est,
                     None if measured is None else float(opt.cost), split)
