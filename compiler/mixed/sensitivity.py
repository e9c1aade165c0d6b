"""Per-layer sensitivity to weight quantization: how much damage quantizing one linear does.

Two estimators, per linear ``W[K, N]`` and candidate ``(bits, group)``, both additive over layers
(the integer program sums them):

* ``cheap`` — the calibration-weighted weight perturbation.  With ``H = XᵀX / T`` the second
  moment of the layer's input over the T calibration tokens, the output error of ``ΔW = Ŵ - W`` is
  ``E‖x·ΔW‖² = Σ_n ΔW_:,nᵀ H ΔW_:,n``; keeping only H's diagonal gives
  ``Σ_j H_jj ‖ΔW_j,:‖²``, which splits exactly over output columns (``per_column``).
* ``measured`` — the change of the model's loss on the calibration samples when that layer alone
  is quantized (RTN, see :mod:`lowbit.quant.rtn`), everything else in float: next-token NLL for a causal
  LM (``measured``), or the KL divergence from the float model's next-token distribution
  (``measured-kl``); for an encoder, the mean ``1 - cos`` between quantized and float outputs.
  ``quantizer`` names how the probe simulates the weight, as ``quantize-weights`` will write it:
  ``rtn``; ``gptq`` (asymmetric GPTQ); ``gptq-mod[:SCALES]`` — asymmetric GPTQ with clip search, and at 2
  and 3 bits the mixture of data types with the Hessian-weighted fit and SCALES (float32, float16, uint8)
  scale storage: ``quantize-weights{method=gptq,symmetric=false,clip_search=true,dtype=mod,hessian_fit=true,
  scale_dtype=SCALES}``.
  One ORT session serves all layers: linear weights are declared as graph inputs with their
  initializer as default, so one layer's weight is overridden per run.

Measured values are cached on disk (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), keyed by a hash of
the model's weights and graph, the calibration feeds, the layer, bits and group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import Linear
from lowbit.quant.stats import act_stats
from lowbit.errors import CalibrationError
from lowbit.quant.rtn import FLOAT_BITS, fake_quant

__all__ = ["cheap_per_column", "cheap_sensitivity", "LossProbe", "measured_sensitivity", "model_fingerprint",
           "feeds_fingerprint", "SensitivityCache", "ESTIMATORS",
           "simulated_weight", "simulated_array", "ProbeWorker", "quantizer_tag"]

logger = logging.getLogger(__name__)

ESTIMATORS = ("cheap", "measured", "measured-kl")


def _weight(lin: Linear) -> np.ndarray:
    return np.asarray(lin.weight.const_value.numpy(), np.float32)


def hessian_diag(lin: Linear) -> np.ndarray:
    st = act_stats(lin.input)
    if st is None or st.xtx is None:
        raise CalibrationError(f"linear '{lin.name}' has no XᵀX statistics",
                               hint="run 'calibrate{hessian=true}' before estimating sensitivity")
    return np.diag(st.xtx) / max(st.count, 1)


def cheap_per_column(lin: Linear, bits: int, group: int, hdiag: np.ndarray | None = None) -> np.ndarray:
    """``Σ_j H_jj ΔW_jn²`` for every output column n (float64 [N])."""
    if bits >= FLOAT_BITS:
        return np.zeros(lin.shape[1])
    w = _weight(lin)
    dw = (fake_quant(w, bits, group) - w).astype(np.float64)
    h = hessian_diag(lin) if hdiag is None else hdiag
    return (h[:, None] * dw * dw).sum(axis=0)


def cheap_sensitivity(lin: Linear, bits: int, group: int) -> float:
    return float(cheap_per_column(lin, bits, group).sum())


def model_fingerprint(model: ir.Model) -> str:
    """Hash of the graph structure and every initializer's bytes."""
    h = hashlib.sha256()
    for node in model.graph:
        h.update(f"{node.domain}:{node.op_type}:{node.name};".encode())
    for name, v in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if v.const_value is not None:
            h.update(np.ascontiguousarray(v.const_value.numpy()).tobytes())
    return h.hexdigest()[:24]


def feeds_fingerprint(feeds: list[dict]) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for k in sorted(feed):
            a = np.ascontiguousarray(feed[k])
            h.update(f"{k}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def quantizer_tag(quantizer: str) -> str:
    return "" if quantizer == "rtn" else f"@{quantizer}"


class SensitivityCache:
    """One JSON file per (model, calibration) pair: ``"layer|bits|group|metric" -> value``."""

    def __init__(self, root: str | os.PathLike | None, model_hash: str, feeds_hash: str):
        root = Path(root or os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit") / "sensitivity"
        self.path = root / f"{model_hash}-{feeds_hash}.json"
        self.data: dict[str, float] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring unreadable sensitivity cache %s", self.path)

    @staticmethod
    def key(layer: str, bits: int, group: int, metric: str) -> str:
        return f"{layer}|{bits}|{group}|{metric}"

    def get(self, *key) -> float | None:
        return self.data.get(self.key(*key))

    def put(self, value: float, *key) -> None:
        self.data[self.key(*key)] = value

    def save(self) -> None:
        """Write atomically, merged with what other processes saved meanwhile (values are deterministic)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.data = {**json.loads(self.path.read_text()), **self.data}
        except (OSError, ValueError):
            pass
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
        tmp.replace(self.path)


def _batch_causal(feeds: list[dict], batch: int) -> tuple[list[dict], list[np.ndarray]]:
    """Stack single-row token feeds into batches, right-padded; masks mark the scored positions.

    Right padding is exact for a causal LM: no real position attends to a later (padded) one.
    """
    (name,) = feeds[0].keys()
    rows = [r for f in feeds for r in np.asarray(f[name])]
    rows.sort(key=len)
    out, masks = [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        t = max(len(r) for r in chunk)
        arr = np.zeros((len(chunk), t), np.int64)
        mask = np.zeros((len(chunk), t - 1), np.float64)
        for j, r in enumerate(chunk):
            arr[j, : len(r)] = r
            mask[j, : len(r) - 1] = 1.0
        out.append({name: arr})
        masks.append(mask)
    return out, masks


class LossProbe:
    """Runs the model on calibration feeds with one linear's weight replaced; returns the loss."""

    def __init__(self, model: ir.Model, feeds: list[dict], weights: list[str], kind: str = "causal-lm",
                 batch: int = 1, threads: int = 1):
        import onnx

        from lowbit.ir.sessions import make_session, to_proto

        proto = to_proto(model)
        inits = {t.name: t for t in proto.graph.initializer}
        declared = {i.name for i in proto.graph.input}
        for name in weights:
            if name not in declared:  # an initializer listed as input is an overridable default
                t = inits[name]
                proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.session = make_session(proto, threads=threads)
        self.kind = kind
        self.feeds, self.masks = (_batch_causal(feeds, batch) if kind == "causal-lm" else (feeds, [None] * len(feeds)))
        self.reference = [self._run(f, {}) for f in self.feeds]
        self.base = self.losses({})

    def _run(self, feed: dict, overrides: dict) -> np.ndarray:
        out = self.session.run(None, {**feed, **overrides})[0]
        if self.kind == "causal-lm":
            z = out[:, :-1].astype(np.float32)
            z = z - z.max(axis=-1, keepdims=True)
            return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return out.astype(np.float32)

    def losses(self, overrides: dict[str, np.ndarray]) -> dict[str, float]:
        """``{"nll", "kl"}`` per scored token for a causal LM, ``{"cos"}`` (mean 1 - cos) for an encoder."""
        totals: dict[str, float] = {}
        count = 0
        for i, feed in enumerate(self.feeds):
            out, ref = self._run(feed, overrides), self.reference[i]
            if self.kind == "encoder":
                cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
                totals["cos"] = totals.get("cos", 0.0) + float((1.0 - cos).sum())
                count += cos.size
                continue
            mask = self.masks[i]
            tgt = next(iter(feed.values()))[:, 1:]
            nll = -np.take_along_axis(out, tgt[..., None], axis=-1)[..., 0]
            kl = (np.exp(ref) * (ref - out)).sum(-1)
            totals["nll"] = totals.get("nll", 0.0) + float((nll * mask).sum())
            totals["kl"] = totals.get("kl", 0.0) + float((kl * mask).sum())
            count += int(mask.sum())
        return {k: v / max(count, 1) for k, v in totals.items()}


def simulated_weight(lin: Linear, bits: int, group: int, quantizer: str = "rtn") -> np.ndarray:
    """Ŵ of ``lin`` at (bits, group) as the materialiser will compute it: RTN (:mod:`lowbit.quant.rtn`), or
    asymmetric GPTQ from the calibration XᵀX as ``quantize-weights{method=gptq,symmetric=false}`` runs it."""
    return simulated_array(_weight(lin), _xtx(lin, bits, quantizer), bits, group, quantizer)


def _xtx(lin: Linear, bits: int, quantizer: str) -> np.ndarray | None:
    if bits >= FLOAT_BITS or quantizer == "rtn":
        return None
    st = act_stats(lin.input)
    if st is None or st.xtx is None:
        raise CalibrationError(f"linear '{lin.name}' has no XᵀX statistics for GPTQ",
                               hint="run 'calibrate{hessian=true}' before assign-bits")
    return st.xtx


def simulated_array(w: np.ndarray, xtx: np.ndarray | None, bits: int, group: int, quantizer: str) -> np.ndarray:
    """:func:`simulated_weight` on arrays (a pure function: what a Ray task computes)."""
    if bits >= FLOAT_BITS or quantizer == "rtn":
        return fake_quant(w, bits, group)
    from lowbit.quant.gptq import dequantize, gptq_quantize

    g = 0 if group >= w.shape[0] else group
    if quantizer.startswith("gptq-mod"):
        mod = bits in (2, 3)
        scales = quantizer.partition(":")[2] or "float32"
        dtype = "mod" if mod else "int"
        q, sc, z = gptq_quantize(w, xtx, bits, g, symmetric=False, clip_search=True, dtype=dtype, hessian_fit=mod,
                                 scale_dtype=scales if mod else "float32")
        return dequantize(q, sc, z, g, bits, dtype).astype(np.float32)
    q, sc, z = gptq_quantize(w, xtx, bits, g, symmetric=False)
    return dequantize(q, sc, z, g).astype(np.float32)


class ProbeWorker:
    """One Ray worker's loss probe: the session is built once, then serves many (layer, bits, group)."""

    def __init__(self, proto_bytes: bytes, feeds: list[dict], weights: list[str], kind: str):
        import onnx

        model = ir.serde.deserialize_model(onnx.load_from_string(proto_bytes))
        self.probe = LossProbe(model, feeds, weights, kind)

    def delta(self, name: str, w: np.ndarray, xtx, bits: int, group: int, quantizer: str) -> dict[str, float]:
        values = self.probe.losses({name: simulated_array(w, xtx, bits, group, quantizer)})
        return {m: v - self.probe.base[m] for m, v in values.items()}


def measured_sensitivity(model: ir.Model, jobs: list[tuple[Linear, int, int]], feeds: list[dict], *,
                         kind: str = "causal-lm", metric: str = "nll", cache_dir=None, quantizer: str = "rtn",
                         progress: bool = True, ray: str = "") -> dict[tuple[str, int, int], float]:
    """Loss(layer alone quantized at (bits, group)) − loss(float model), for every job (layer, bits, group);
    with ``ray`` (``auto`` or an address) the jobs run on Ray workers, one loss probe per worker."""
    from tqdm.auto import tqdm

    if not feeds:
        raise CalibrationError("the measured sensitivity estimator needs calibration samples",
                               hint="pass --calibration, or use estimator=cheap")
    metric = "cos" if kind == "encoder" else metric
    cache = SensitivityCache(cache_dir, model_fingerprint(model), feeds_fingerprint(feeds))
    out, todo = {}, []
    for lin, bits, group in jobs:
        if bits >= FLOAT_BITS:
            out[(lin.name, bits, group)] = 0.0
            continue
        hit = cache.get(lin.name, bits, group, metric + quantizer_tag(quantizer))
        if hit is None:
            todo.append((lin, bits, group))
        else:
            out[(lin.name, bits, group)] = hit
    if todo and ray:
        from lowbit.ir.sessions import to_proto
        from lowbit.quant.parallel import map_actors

        weights = sorted({lin.weight.name for lin, _, _ in todo})
        items = [(lin.weight.name, _weight(lin), _xtx(lin, bits, quantizer), bits, group, quantizer)
                 for lin, bits, group in todo]
        init = (to_proto(model).SerializeToString(), feeds, weights, kind)
        deltas = map_actors(ProbeWorker, init, "delta", items, ray)
        for (lin, bits, group), values in zip(todo, deltas):
            for m, v in values.items():
                cache.put(v, lin.name, bits, group, m + quantizer_tag(quantizer))
            out[(lin.name, bits, group)] = values[metric]
        cache.save()
    elif todo:
        probe = LossProbe(model, feeds, sorted({lin.weight.name for lin, _, _ in todo}), kind)
        for i, (lin, bits, group) in enumerate(tqdm(todo, desc="sensitivity", unit="probe", disable=not progress)):
            values = probe.losses({lin.weight.name: simulated_weight(lin, bits, group, quantizer)})
            for m, v in values.items():  # every metric of the one run is cached
                cache.put(v - probe.base[m], lin.name, bits, group, m + quantizer_tag(quantizer))
            out[(lin.name, bits, group)] = values[metric] - probe.base[metric]
            if i % 16 == 15:
                cache.save()
        cache.save()
    return out
