"""Weight-only low-bit quantization of linear layers (RTN or GPTQ), materialised in standard form.

``W[K, N] ≈ Ŵ = (q − z)·s`` per (group of ``group`` input rows, output column); see
``weight_quant`` for the quantizers.  The result replaces the weight initializer:

* 2, 4, 8 bits: ``DequantizeLinear`` of an INT{b} (symmetric: values q − z, no zero point) or
  UINT{b} (asymmetric: codes and zero points) initializer, blocked along K (``axis=0,
  block_size=group``; per channel ``axis=1``) feeding the MatMul.  INT2/UINT2 need opset 25, so
  the model's opset is raised to 25 when a 2-bit layer is made.  ``lower-nbits`` turns these into
  ``com.microsoft.MatMulNBits``.
* 3 bits: ONNX has no 3-bit type, so the MatMul becomes ``lowbit.MatMul3Bit`` with codes packed
  3 bits per weight (see ``lowbit.ops.float_ops``); its function body lets any runtime run it.
* ``dtype=mod`` (2 and 3 bits): a mixture of data types per group (``lowbit.quant.mod``, after BitMoD):
  each (group, column) picks one of four grids, ``Ŵ = s·L_t[q]``; the MatMul becomes
  ``lowbit.MatMulGrid`` over packed codes (8 per `bits` bytes), UINT2 grid indices and float scales
  (``scale_dtype``: stored as float32, float16, or uint8 codes times a float32 step per column).

Per-layer overrides (the mixed-precision contract): ``metadata_props['lowbit.bits']`` on a
linear's MatMul node ("2", "3", "4", "8", or "16" = keep float) and optionally
``'lowbit.group'`` take precedence over the pass options.  ``'lowbit.bits_split'`` (JSON
``{"columns": [...], "bits": b, "group": g}``, written by ``assign-bits{split=...}``) splits a
layer first: ``y = x·W`` becomes ``Gather(Concat(x·W[:, rest], x·W[:, cols]), order, axis=-1)``
with ``order`` (int32) the inverse of the column permutation ``rest ++ cols``; each part is then a
linear of its own (``<name>.rest`` at the node's bits, ``<name>.salient`` at ``b``/``g``), so
``lower-nbits`` gives two MatMulNBits.  GPTQ reads XᵀX from ``calibrate{hessian=true}`` (both
parts read the same input) and runs layer by layer with a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import Linear, find_linears
from lowbit.quant.stats import act_stats
from lowbit.ops.registry import DOMAIN, attach_functions
from lowbit.ops.float_ops import pack3
from lowbit.passmanager.manager import HESSIAN, QUANTIZED, Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, replace_value

from lowbit.quant.gptq import gptq_quantize, rtn_quantize
from lowbit.quant.mod_graph import write_mod_matmul

__all__ = ["QuantizeWeights", "BITS_KEY", "GROUP_KEY"]

BITS_KEY = "lowbit.bits"
GROUP_KEY = "lowbit.group"
SPLIT_KEY = "lowbit.bits_split"
_SIGNED = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}
_UNSIGNED = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}


def _quantize_array(w, xtx, bits, group, method, symmetric, clip_search, act_order, damp, hqq, dtype="int",
                    hessian_fit=False, scale_dtype="float32"):
    """(codes, scales, zero points) of one weight: a pure function, run here or as a Ray task."""
    if method == "gptq":
        return gptq_quantize(w, xtx, bits, group, symmetric, clip_search, act_order, damp, hqq=hqq, dtype=dtype,
                             hessian_fit=hessian_fit, scale_dtype=scale_dtype)
    return rtn_quantize(w, bits, group, symmetric, clip_search, hqq, dtype, scale_dtype)


@register_pass("quantize-weights")
class QuantizeWeights(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 4
        group: int = 128  # rows of K per scale; 0 = per output channel
        method: Literal["rtn", "gptq"] = "rtn"
        symmetric: bool = True
        clip_search: bool = False
        act_order: bool = False
        damp: float = 0.01
        exclude: str = ""  # '|'-separated substrings of linear names that stay float
        hqq: bool = False  # HQQ-style zero-point/scale refinement per group (asymmetric)
        sequential: bool = False  # GPTQ: each stage's XᵀX from inputs through the already-quantized stages
        ray: str = ""  # quantize layers as Ray tasks: 'auto' or a cluster address ('' = in this process)
        dtype: Literal["int", "mod"] = "int"  # mod: per-group mixture of data types at 2/3 bits (lowbit.quant.mod)
        hessian_fit: bool = False  # gptq + dtype=mod: grid/scale per group by diag(XᵀX)-weighted error
        scale_dtype: Literal["float32", "float16", "uint8"] = "float32"  # dtype=mod: how group scales are stored

        def __post_init__(self):
            if self.bits not in (2, 3, 4, 8):
                raise ValueError(f"quantize-weights: bits must be 2, 3, 4 or 8, got {self.bits}")
            if self.group == 8 and self.dtype != "mod":
                raise ValueError("quantize-weights: group=8 needs dtype=mod (MatMulNBits blocks are >= 16)")
            if self.group not in (0, 8, 16, 32, 64, 128, 256):
                raise ValueError(f"quantize-weights: group must be 0 (per channel) or 16..256, got {self.group}")
            if self.method not in ("rtn", "gptq"):
                raise ValueError(f"quantize-weights: method must be rtn or gptq, got {self.method}")
            if not 0 <= self.damp < 1:
                raise ValueError(f"quantize-weights: damp must be in [0, 1), got {self.damp}")
            if self.hqq and self.symmetric:
                raise ValueError("quantize-weights: hqq=true refines zero points; it needs symmetric=false")
            if self.dtype not in ("int", "mod"):
                raise ValueError(f"quantize-weights: dtype must be int or mod, got {self.dtype}")
            if self.dtype == "mod" and self.hqq:
                raise ValueError("quantize-weights: dtype=mod picks a grid per group; it does not combine with hqq")
            if self.hessian_fit and (self.dtype != "mod" or self.method != "gptq"):
                raise ValueError("quantize-weights: hessian_fit=true needs method=gptq and dtype=mod")
            if self.scale_dtype not in ("float32", "float16", "uint8"):
                raise ValueError(f"quantize-weights: scale_dtype must be float32, float16 or uint8, got {self.scale_dtype}")
            if self.scale_dtype != "float32" and self.dtype != "mod":
                raise ValueError("quantize-weights: scale_dtype=float16|uint8 is a storage form of dtype=mod")
            if self.sequential and self.method != "gptq":
                raise ValueError("quantize-weights: sequential=true is a GPTQ option (method=gptq)")

    ensures_properties = (QUANTIZED,)

    @property
    def requires_properties(self):
        # sequential GPTQ measures each stage's XᵀX itself, from the calibration samples
        return (HESSIAN,) if self.options.method == "gptq" and not self.options.sequential else ()

    def _plan(self, lin: Linear) -> tuple[int, int] | None:
        pats = [p for p in self.options.exclude.split("|") if p]
        if any(p in lin.name for p in pats):
            return None
        props = lin.node.metadata_props
        bits = int(props.get(BITS_KEY, self.options.bits))
        group = int(props.get(GROUP_KEY, self.options.group))
        if bits == 16:
            return None
        if bits not in (2, 3, 4, 8):
            self.fail(f"metadata {BITS_KEY}={bits} on '{lin.name}' is not one of 2, 3, 4, 8, 16", node=lin.node)
        return bits, group

    def call(self, model):
        from tqdm.auto import tqdm

        graph = model.graph
        o = self.options
        for lin in find_linears(graph):
            if SPLIT_KEY in lin.node.metadata_props and self._plan(lin) is not None:
                self._split(graph, lin)
        todo = [(lin, plan) for lin in find_linears(graph) if (plan := self._plan(lin)) is not None]
        self.stats["float_linears"] = len(find_linears(graph)) - len(todo)
        if o.method == "gptq" and not o.sequential:
            missing = [lin.name for lin, _ in todo if (st := act_stats(lin.input)) is None or st.xtx is None]
            if missing:
                self.fail(f"GPTQ needs XᵀX for every quantized linear; missing for {missing[:3]}",
                          hint="run calibrate{hessian=true} right before quantize-weights")
        if any(b == 2 for _, (b, _) in todo) or any(self._dtype(b) == "mod" for _, (b, _) in todo):
            model.opset_imports[""] = max(model.opset_imports.get("", 1), 25)
        elif todo:
            model.opset_imports[""] = max(model.opset_imports.get("", 1), 21)
        bits_total = 0
        results = self._sequential(model, todo) if o.sequential else self._parallel(todo) if o.ray else {}
        for lin, (bits, group) in tqdm(todo, desc=f"quantize-weights ({o.method})", unit="layer",
                                       disable=not self.ctx.show_progress, leave=False):
            if lin.name in results:
                w, group, (q, s, z) = results.pop(lin.name)
            else:
                w, group, (q, s, z) = self._quantize(lin, bits, group, None)
            if self._dtype(bits) == "mod":
                self._mod(graph, lin, q, s, z, bits, group, w)
            elif bits == 3:
                self._matmul3bit(graph, lin, q, s, z, group)
            else:
                self._dequantize(graph, lin, q, s, z, bits, group)
            bits_total += bits * w.size
            self.stats[f"w{bits}"] += 1
            del w
            if isinstance(lin.weight.const_value, ir.ExternalTensor):
                lin.weight.const_value.release()  # layer by layer: the float weight leaves memory
        graph.meta.pop("lowbit.names", None)
        attach_functions(model)
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
        self.ctx.report["quantize-weights"] = {"method": o.method, "linears": len(todo),
                                               "float_linears": self.stats["float_linears"],
                                               "code_bits": bits_total}
        return PassResult(model, modified=bool(todo))

    def _job(self, lin: Linear, bits: int, group: int, xtx) -> tuple:
        """The arguments of :func:`_quantize_array` for one linear."""
        o = self.options
        w = lin.weight.const_value.numpy()
        if not np.all(np.isfinite(w)):
            self.fail(f"weight of '{lin.name}' holds NaN/Inf", node=lin.node)
        if group >= w.shape[0]:
            group = 0  # one group covers the whole column: per channel
        if o.method == "gptq" and xtx is None:
            xtx = act_stats(lin.input).xtx
        dtype = self._dtype(bits)
        return (w, xtx, bits, group, o.method, o.symmetric, o.clip_search, o.act_order, o.damp, o.hqq, dtype,
                o.hessian_fit and dtype == "mod", o.scale_dtype if dtype == "mod" else "float32")

    def _dtype(self, bits: int) -> str:
        """The mixture of data types covers 2 and 3 bits; wider layers of a mixed plan stay integer."""
        return self.options.dtype if bits in (2, 3) else "int"

    def _quantize(self, lin: Linear, bits: int, group: int, xtx):
        """(weight, effective group, (codes, scales, zero points)) of one linear."""
        job = self._job(lin, bits, group, xtx)
        return job[0], job[3], _quantize_array(*job)

    def _parallel(self, todo) -> dict:
        """Every layer as one Ray task (lowbit.quant.parallel); the same arrays as the local loop."""
        from lowbit.quant.parallel import map_tasks

        jobs = [self._job(lin, bits, group, None) for lin, (bits, group) in todo]
        results = map_tasks(_quantize_array, jobs, self.options.ray)
        return {lin.name: (job[0], job[3], res) for (lin, _), job, res in zip(todo, jobs, results)}

    def _sequential(self, model, todo) -> dict:
        """True-sequential GPTQ: stage by stage, XᵀX from the quantized prefix (lowbit.quant.sequential);
        the layers of one stage are independent (Ray tasks with ``ray``)."""
        from lowbit.ir.sessions import to_proto
        from lowbit.quant.gptq import dequantize
        from lowbit.quant.parallel import map_tasks
        from lowbit.quant.sequential import SequentialCalibrator, linear_stages

        if not self.ctx.calibration:
            self.fail("sequential=true needs calibration samples", hint="pass --calibration FILE_OR_DIR")
        plan = {lin.node: p for lin, p in todo}
        cal = SequentialCalibrator(to_proto(model), self.ctx.calibration)
        out = {}
        for stage in linear_stages(model.graph, [lin for lin, _ in todo]):
            xtx = cal.hessians(sorted({lin.input.name for lin in stage}))
            jobs = [self._job(lin, *plan[lin.node], xtx[lin.input.name]) for lin in stage]
            for lin, job, qsz in zip(stage, jobs, map_tasks(_quantize_array, jobs, self.options.ray)):
                cal.set_weight(lin.weight.name, dequantize(*qsz, job[3], job[2], job[10]))
                out[lin.name] = (job[0], job[3], qsz)
            self.stats["stages"] += 1
        return out

    def _split(self, graph, lin: Linear) -> None:
        """One linear → two (rest, salient columns) + Concat + Gather back into column order."""
        import json

        try:
            spec = json.loads(lin.node.metadata_props[SPLIT_KEY])
            cols = np.asarray(spec["columns"], np.int64)
            bits, group = int(spec["bits"]), int(spec["group"])
        except (ValueError, KeyError, TypeError) as exc:
            self.fail(f"'{lin.name}': {SPLIT_KEY} is not {{\"columns\": [...], \"bits\": b, \"group\": g}} ({exc})",
                      node=lin.node)
        w = lin.weight.const_value.numpy()
        n = w.shape[1]
        if cols.ndim != 1 or not 0 < cols.size < n or len(np.unique(cols)) != cols.size or cols.min() < 0 \
                or cols.max() >= n:
            self.fail(f"'{lin.name}': {SPLIT_KEY} columns must be distinct, within 0..{n - 1}, and neither none "
                      "nor all of them", node=lin.node)
        rest = np.setdiff1d(np.arange(n), cols)
        own = {k: v for k, v in lin.node.metadata_props.items() if k != SPLIT_KEY}
        parts = []
        for role, idx, props in (("rest", rest, own), ("salient", cols, {BITS_KEY: str(bits), GROUP_KEY: str(group)})):
            wv = add_initializer(graph, f"{lin.name}.{role}.weight", np.ascontiguousarray(w[:, idx]))
            mm = make_node(graph, "MatMul", [lin.input, wv], origin=self.name, name=f"{lin.name}.{role}",
                           before=lin.node)
            mm.metadata_props.update({k: v for k, v in props.items() if k in (BITS_KEY, GROUP_KEY)})
            parts.append(mm.outputs[0])
        cat = make_node(graph, "Concat", parts, origin=self.name, name=f"{lin.name}.split_concat",
                        attributes={"axis": -1}, before=lin.node)
        order = add_initializer(graph, f"{lin.name}.split_order",
                                np.argsort(np.concatenate([rest, cols])).astype(np.int32))
        back = make_node(graph, "Gather", [cat.outputs[0], order], origin=self.name, name=f"{lin.name}.split_gather",
                         attributes={"axis": -1}, before=lin.node)
        out = lin.node.outputs[0]
        if out.dtype is not None:
            back.outputs[0].shape, back.outputs[0].dtype = out.shape, out.dtype
        replace_value(graph, out, back.outputs[0])
        graph.remove(lin.node, safe=True)
        self.stats["split"] += 1

    def _tag(self, node: ir.Node, bits: int, group: int) -> None:
        node.metadata_props[BITS_KEY] = str(bits)
        node.metadata_props[GROUP_KEY] = str(group)
        node.metadata_props["lowbit.method"] = self.options.method

    def _dequantize(self, graph, lin: Linear, q, s, z, bits: int, group: int) -> None:
        name = lin.name
        if self.options.symmetric:
            vals = (q.astype(np.int16) - z.astype(np.int16)[np.arange(q.shape[0]) // (group or q.shape[0])])
            data = add_initializer(graph, f"{name}.weight_q", vals.astype(_SIGNED[bits]))
            zp = None
        else:
            data = add_initializer(graph, f"{name}.weight_q", q.astype(_UNSIGNED[bits]))
            zp = z.astype(_UNSIGNED[bits])
        if group:
            attrs = {"axis": 0, "block_size": group}
        else:  # per output channel: 1-D scale along axis 1
            attrs = {"axis": 1}
            s, zp = s[0], None if zp is None else zp[0]
        inputs = [data, add_initializer(graph, f"{name}.weight_scale", s.astype(np.float32))]
        if zp is not None:
            inputs.append(add_initializer(graph, f"{name}.weight_zero_point", zp))
        dq = make_node(graph, "DequantizeLinear", inputs, origin=self.name, name=f"{name}.weight_dq",
                       attributes=attrs, before=lin.node)
        self._tag(dq, bits, group)
        self._tag(lin.node, bits, group)
        lin.node.replace_input_with(1, dq.outputs[0])

    def _mod(self, graph, lin: Linear, q, s, z, bits: int, group: int, w) -> None:
        node = write_mod_matmul(graph, lin.node, lin.name, q, s, z, bits, group, origin=self.name,
                                scale_dtype=self.options.scale_dtype, weight=w)
        self._tag(node, bits, group)
        node.metadata_props["lowbit.dtype"] = "mod"
        node.metadata_props["lowbit.k"] = str(q.shape[0])

    def _matmul3bit(self, graph, lin: Linear, q, s, z, group: int) -> None:
        name, k = lin.name, q.shape[0]
        packed = add_initializer(graph, f"{name}.weight_q3", pack3(np.ascontiguousarray(q.T)))
        sv = add_initializer(graph, f"{name}.weight_scale", np.ascontiguousarray(s.T))
        zv = add_initializer(graph, f"{name}.weight_zero_point", np.ascontiguousarray(z.T))
        node = make_node(graph, "MatMul3Bit", [lin.input, packed, sv, zv], origin=self.name, name=name,
                         domain=DOMAIN, attributes={"block_size": group or k}, before=lin.node)
        self._tag(node, 3, group)
        node.metadata_props["lowbit.k"] = str(k)
        out, new = lin.node.outputs[0], node.outputs[0]
        if out.dtype is not None:
            new.shape, new.dtype = out.shape, out.dtype
        replace_value(graph, out, new)
        graph.remove(lin.node, safe=True)
