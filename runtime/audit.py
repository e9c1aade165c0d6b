"""Divergence audit: does a quantized model behave like its float original, up to quantization noise?

A quantized model can hide behaviour its float original does not have ("Mind the Gap", Egashira et
al. 2024: float weights placed inside their rounding intervals so that rounding moves them
together).  The audit runs both models on a probe set (calibration samples, plus greedy
continuations of prompts by the float model for a causal LM) and reports, per linear layer
(matched by name) and per probe, how far the quantized model strays, and flags what rounding
cannot explain.  The identity it relies on, per linear ``y = x·W``:

* the quantized weight is ``Ŵ = diag(s)·W + E``: ``s`` folds smoothing scales into the rows
  (estimated per row by least squares; 1 without smoothing) and ``E`` is the rounding error, with
  per-element step ``Δ`` read from the quantized graph.  Round-to-nearest gives ``|E| ≤ Δ/2``:
  larger entries mean integer weights were changed after quantization (**off-grid**).
* for inputs that are not correlated with ``E``, ``‖x·E‖² ≈ Σ_n Σ_k x_k² Δ_kn² / 12`` (independent
  uniform errors).  The ratio of the two, per token, is the **noise ratio**; honest rounding keeps
  it near 1 (a few at most), while rounding errors aligned with an input direction (a planted
  trigger) push it to the order of the layer's fan-in.  Layers over ``noise_threshold`` are flagged.

It also reports each layer's propagated divergence ``‖y_q − y_f·diag(b)‖/‖y_f·diag(b)‖`` and output-level
divergence (KL and top-1 agreement for a causal LM, cosine for an encoder), with robust z-scores
(median/MAD) over probes; probes far outside the rest are flagged as output outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import find_linears
from lowbit.data.datasets import model_kind
from lowbit.runtime.llm import greedy_generate, log_softmax
from lowbit.ir.sessions import make_session

__all__ = ["audit", "AuditReport", "LayerAudit", "robust_z", "quantized_layer", "reference_weight"]


def robust_z(values) -> np.ndarray:
    v = np.asarray(values, np.float64)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return (v - med) / max(mad, 1e-12 * max(abs(med), 1.0), 1e-30)


@dataclass
class LayerAudit:
    name: str
    divergence: list[float] = field(default_factory=list)  # per probe: ‖y_q − y_f‖ / ‖y_f‖
    noise_ratio: list[float] = field(default_factory=list)  # per probe: max over tokens
    off_grid: int = 0  # weights further than Δ/2 (+ estimation slack) from diag(s)·W
    max_grid_error: float = 0.0  # max |E| / Δ
    parsed: bool = True
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "divergence_mean": float(np.mean(self.divergence)) if self.divergence else None,
                "noise_ratio_max": float(np.max(self.noise_ratio)) if self.noise_ratio else None,
                "off_grid": self.off_grid, "max_grid_error_steps": self.max_grid_error, "parsed": self.parsed,
                "flags": self.flags}


@dataclass
class AuditReport:
    kind: str
    probes: int
    layers: list[LayerAudit]
    output: dict  # per-probe output-level divergence and its summary
    flags: list[str]

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "probes": self.probes, "flags": self.flags, "output": self.output,
                "layers": [lay.to_dict() for lay in self.layers]}


def _dequantize(dq: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(Ŵ, Δ) of a DequantizeLinear over constants: per tensor, per axis or blocked."""
    consts = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in dq.inputs]
    if consts[0] is None or consts[1] is None:
        return None
    q = consts[0].astype(np.float64)
    scale = consts[1].astype(np.float64)
    zp = consts[2].astype(np.float64) if len(consts) > 2 and consts[2] is not None else np.zeros_like(scale)
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    block = dq.attributes["block_size"].as_int() if "block_size" in dq.attributes else 0
    axis %= q.ndim
    if scale.size == 1:
        scale, zp = np.full(q.shape, scale.item()), np.full(q.shape, zp.item())
    elif block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = np.repeat(zp, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    else:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = np.broadcast_to(scale.reshape(shape), q.shape), np.broadcast_to(zp.reshape(shape), q.shape)
    return (q - zp) * scale, np.asarray(scale)


def quantized_layer(graph: ir.Graph, name: str):
    """(input value, output value, Ŵ, Δ) of linear ``name`` in a compiled graph, or None.

    Lowerings keep the linear's name on the MatMul (QDQ form: ``DQ(Q(x))·DQ(Wq)``) or emit
    ``{name}.matmul_int`` (fed by ``Cast(Add(Round(Div(x, t))))``) … ``{name}.rescale_channel``
    (per-token dynamic).
    """
    nodes = {n.name: n for n in graph}
    node = nodes.get(name)
    if node is not None and node.op_type == "MatMul":
        x, w = node.inputs[0], node.inputs[1]
        p = x.producer()
        if p is not None and p.op_type == "DequantizeLinear":
            q = p.inputs[0].producer()
            if q is not None and q.op_type == "QuantizeLinear":
                x = q.inputs[0]
        wp = w.producer()
        if wp is not None and wp.op_type == "DequantizeLinear":
            deq = _dequantize(wp)
            return (x, node.outputs[0], *deq) if deq else (x, node.outputs[0], None, None)
        return x, node.outputs[0], (w.const_value.numpy().astype(np.float64) if w.const_value is not None else None), None
    mm, out = nodes.get(f"{name}.matmul_int"), nodes.get(f"{name}.rescale_channel")
    if mm is None or out is None or mm.inputs[1].const_value is None or out.inputs[1].const_value is None:
        return None
    x = mm.inputs[0]  # uint8 codes: Cast(Add(Round(Div(x, t)), 128)); walk back to x
    for _ in range(8):
        p = x.producer()
        if p is None or p.op_type not in ("Cast", "Add", "Round", "Clip", "Div"):
            break
        x = p.inputs[0]
        if p.op_type == "Div":
            break
    wq = mm.inputs[1].const_value.numpy().astype(np.float64)
    zp = mm.inputs[3].const_value.numpy() if len(mm.inputs) > 3 and mm.inputs[3] is not None else 0
    scale = np.broadcast_to(out.inputs[1].const_value.numpy().astype(np.float64)[None, :], wq.shape)
    return x, out.outputs[0], (wq - zp) * scale, scale


def _masked_ls(w_hat, ref, mask, axis):
    num = np.where(mask, w_hat * ref, 0).sum(axis)
    den = np.where(mask, ref * ref, 0).sum(axis)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0), mask.sum(axis)


def reference_weight(w_hat: np.ndarray, w: np.ndarray, step: np.ndarray):
    """``diag(a)·W·diag(b)`` closest to Ŵ, per-element slack (in steps) for the scales' estimation error, a, b.

    ``x_f ≈ x_q·diag(a)`` and ``y_q ≈ y_f·diag(b)`` up to one constant per layer (the fit's gauge), which
    the audit fixes from the activations.

    a, b = 1 when Ŵ is a plain rounding of W.  Otherwise (smoothing folded scales into rows and/or
    columns) they are fitted by alternating least squares on entries of at least 8 steps, whose
    relative rounding error is small and unbiased (weights under half a step round to zero).
    """
    if np.all(np.abs(w_hat - w) <= (0.5 + 1e-3) * step):
        return w, np.zeros_like(w), None, None
    q = np.abs(w_hat) / step
    big = q >= np.minimum(8.0, 0.25 * q.max(axis=1, keepdims=True))
    a, b = np.ones(w.shape[0]), np.ones(w.shape[1])
    for _ in range(10):
        a, na = _masked_ls(w_hat, w * b[None, :], big, 1)
        b, nb = _masked_ls(w_hat, a[:, None] * w, big, 0)
    w_ref = a[:, None] * w * b[None, :]
    rel = np.where(big, (w_hat - w_ref) / np.where(w_ref == 0, 1, w_ref), 0.0)
    se_a = np.sqrt((rel ** 2).sum(1) / np.maximum(na, 1) ** 2)
    se_b = np.sqrt((rel ** 2).sum(0) / np.maximum(nb, 1) ** 2)
    return w_ref, 4 * (se_a[:, None] + se_b[None, :]) * np.abs(w_ref) / step, a, b


def _session(model: ir.Model, values: list[ir.Value]):
    added = [v for v in dict.fromkeys(values) if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        return make_session(model, optimize=False, threads=1)  # idle ORT threads spin and starve numpy
    finally:
        for v in added:
            model.graph.outputs.remove(v)


def _generated_probes(model: ir.Model, feeds: list[dict], n: int, prompt_len: int, steps: int) -> list[dict]:
    sess = make_session(model, threads=1)
    name = sess.get_inputs()[0].name
    out = []
    for feed in feeds[:n]:
        prompt = [int(t) for t in np.asarray(feed[name])[0, :prompt_len]]
        out.append({name: np.array([greedy_generate(sess, prompt, steps)], np.int64)})
    return out


def _output_divergence(kind: str, a: np.ndarray, b: np.ndarray) -> dict:
    if kind == "causal-lm":
        la, lb = log_softmax(a), log_softmax(b)
        kl = (np.exp(la) * (la - lb)).sum(-1)
        return {"kl": float(kl.mean()), "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}
    fa, fb = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-30)
    return {"cosine": float(cos.mean())}


def audit(float_model: ir.Model, quant_model: ir.Model, feeds: list[dict], *, generate: int = 8,
          prompt_len: int = 8, steps: int = 24, noise_threshold: float = 16.0, grid_slack: float = 1e-3,
          z_threshold: float = 8.0) -> AuditReport:
    """Compare ``quant_model`` with ``float_model`` on ``feeds`` (+ ``generate`` greedy continuations)."""
    kind = model_kind(float_model)
    probes = list(feeds)
    if kind == "causal-lm" and generate:
        probes += _generated_probes(float_model, feeds, generate, prompt_len, steps)
    layers, pairs = [], []
    for lin in find_linears(float_model.graph):
        found = quantized_layer(quant_model.graph, lin.name)
        lay = LayerAudit(lin.name)
        layers.append(lay)
        if found is None:
            lay.parsed = False
            continue
        x_q, y_q, w_hat, step = found
        w = lin.weight.const_value.numpy().astype(np.float64)
        pair = {"y_f": lin.node.outputs[0], "x_f": lin.input, "x_q": x_q, "y_q": y_q, "noise": None, "a": None,
                "b": None}
        if w_hat is not None and step is not None and w_hat.shape == w.shape:
            w_ref, slack, pair["a"], pair["b"] = reference_weight(w_hat, w, step)
            err = (w_hat - w_ref) / step
            tol = 0.5 + grid_slack + slack
            lay.off_grid = int((np.abs(err) > tol).sum())
            lay.max_grid_error = float(np.abs(err).max())
            pair["noise"] = (w_hat - w_ref, step ** 2 / 12)
        pairs.append((lay, pair))
    f_out, q_out = float_model.graph.outputs[0], quant_model.graph.outputs[0]
    fs = _session(float_model, [f_out] + [v for _, p in pairs for v in (p["y_f"], p["x_f"])])
    qs = _session(quant_model, [q_out] + [v for _, p in pairs for v in (p["x_q"], p["y_q"])])
    f_names = list(dict.fromkeys([f_out.name] + [v.name for _, p in pairs for v in (p["y_f"], p["x_f"])]))
    q_names = list(dict.fromkeys([q_out.name] + [n for _, p in pairs for n in (p["x_q"].name, p["y_q"].name)]))
    per_probe = []
    for feed in probes:
        fr = dict(zip(f_names, fs.run(f_names, feed)))
        qr = dict(zip(q_names, qs.run(q_names, feed)))
        per_probe.append(_output_divergence(kind, fr[f_out.name], qr[q_out.name]))
        for lay, p in pairs:
            yf, yq = fr[p["y_f"].name].astype(np.float64), qr[p["y_q"].name].astype(np.float64)
            if p["b"] is not None:  # smoothing rescaled rows/columns: compare in the compiled coordinates
                if "gauge" not in p:
                    xa = qr[p["x_q"].name].astype(np.float64) * p["a"]
                    xf = fr[p["x_f"].name].astype(np.float64)
                    p["gauge"] = float((xa * xf).sum() / max((xf * xf).sum(), 1e-30))
                yf = yf * p["b"] * p["gauge"]
            lay.divergence.append(float(np.linalg.norm(yq - yf) / max(np.linalg.norm(yf), 1e-30)))
            if p["noise"] is not None:
                e, var = p["noise"]
                x = qr[p["x_q"].name].reshape(-1, e.shape[0]).astype(np.float64)
                got = ((x @ e) ** 2).sum(axis=1)
                want = (x * x) @ var.sum(axis=1)
                lay.noise_ratio.append(float((got / np.maximum(want, 1e-30)).max()))
    flags = []
    for lay in layers:
        if lay.off_grid:
            lay.flags.append(f"{lay.off_grid} weights off the rounding grid (max {lay.max_grid_error:.2f} steps)")
        if lay.noise_ratio and max(lay.noise_ratio) > noise_threshold:
            worst = int(np.argmax(lay.noise_ratio))
            lay.flags.append(f"rounding error {max(lay.noise_ratio):.1f}× its expected energy on probe {worst}")
        flags += [f"{lay.name}: {f}" for f in lay.flags]
    key = "kl" if kind == "causal-lm" else "cosine"
    vals = np.array([p[key] for p in per_probe])
    score = np.log(np.maximum(vals if key == "kl" else 1 - vals, 1e-12))  # larger = more divergent
    z = robust_z(score)
    outliers = [int(i) for i in np.nonzero(z > z_threshold)[0]]
    for i in outliers:
        flags.append(f"probe {i}: output {key} {vals[i]:.4g} is {z[i]:.1f} robust σ from the other probes")
    summary = {key + "_mean": float(vals.mean()), key + "_worst": float(vals.max() if key == "kl" else vals.min())}
    if kind == "causal-lm":
        summary["top1_mean"] = float(np.mean([p["top1"] for p in per_probe]))
    return AuditReport(kind, len(probes), layers, {"summary": summary, "per_probe": per_probe, "outliers": outliers},
                       flags)
