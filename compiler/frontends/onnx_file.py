"""ONNX files → ``ir.Model``: lazy, safe (see model_io), upgraded to opset ≥ 21 when older."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx_ir as ir

from lowbit.errors import ModelLoadError, UnsupportedModelError
from lowbit.ops.registry import DOMAIN
from lowbit.ir.model_io import load_onnx

__all__ = ["load_onnx_model", "check_ops", "refuse_quantized", "MIN_OPSET", "MAX_OPSET", "ORT_ONNX_DOMAIN_OPS",
           "ort_ops_for_checker"]

logger = logging.getLogger(__name__)
MIN_OPSET = 21  # int4 QDQ and blocked quantization need 21
MAX_OPSET = 26  # the newest default-domain opset ONNX Runtime 1.31 loads
# Domains whose ops ONNX Runtime's CPU EP (or lowbit itself) implements.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", DOMAIN}
# ONNX Runtime contrib ops registered in the ONNX domain at every opset (exporters emit them there:
# onnxruntime-genai's builder, onnxscript's fusions below opset 23).
ORT_ONNX_DOMAIN_OPS = {"SimplifiedLayerNormalization"}
_QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "QGemm", "QAttention", "DynamicQuantizeLinear", "ConvInteger", "QLinearConv", "GatherBlockQuantized"}


@contextlib.contextmanager
def ort_ops_for_checker(model: ir.Model):
    """While open, ORT's ONNX-domain contrib ops sit in ``com.microsoft``, so ``onnx.checker`` (which knows
    only standard ops in the default domain and skips other domains) can check the rest of the model."""
    moved = [n for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx") and n.op_type in ORT_ONNX_DOMAIN_OPS]
    had = "com.microsoft" in model.opset_imports
    for n in moved:
        n.domain = "com.microsoft"
    if moved and not had:
        model.opset_imports["com.microsoft"] = 1
    try:
        yield model
    finally:
        for n in moved:
            n.domain = ""
        if moved and not had:
            del model.opset_imports["com.microsoft"]


def refuse_quantized(model: ir.Model, what: str = "the model") -> None:
    """Refuse a model that is already quantized (integer weights behind DequantizeLinear, integer GEMMs)."""
    for node in model.graph:
        quantized = node.op_type in _QUANTIZED_OPS or node.domain == DOMAIN
        if node.op_type == "DequantizeLinear" and node.inputs and node.inputs[0] is not None \
                and node.inputs[0].const_value is not None:
            quantized = True  # a constant integer tensor dequantized: a quantized weight
        if node.op_type == "QuantizeLinear":
            quantized = True  # fake-quantized activations (ORT's QDQ of activation×activation MatMuls)
        if quantized:
            raise UnsupportedModelError(
                f"{what} is already quantized: node '{node.name or '?'}' ({node.domain or 'ai.onnx'}::{node.op_type})",
                hint="compile the float model (lowbit quantizes float weights); quantizing twice compounds the error")


def check_ops(model: ir.Model, path) -> None:
    """Refuse opsets ORT cannot load and ops that no known domain (or model function) defines."""
    import onnx.defs

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset > MAX_OPSET:
        raise UnsupportedModelError(f"{path}: opset {opset} is newer than ONNX Runtime supports ({MAX_OPSET})",
                                    hint=f"re-export the model with opset {MIN_OPSET}..{MAX_OPSET}")
    if opset < 7:
        return  # refused as too old to upgrade
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in model.graph.all_nodes():
        where = f"{path}: node '{node.name or '?'}' ({node.domain or 'ai.onnx'}::{node.op_type})"
        if (node.domain, node.op_type) in functions:
            continue
        if node.domain not in KNOWN_DOMAINS:
            raise UnsupportedModelError(f"{where} uses the unknown op domain '{node.domain}'",
                                        hint="lowbit runs models of the standard ONNX ops (plus com.microsoft); "
                                             "replace or export the custom op as standard ops")
        if node.domain in ("", "ai.onnx") and node.op_type not in ORT_ONNX_DOMAIN_OPS:
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                raise UnsupportedModelError(f"{where}: no op '{node.op_type}' exists in ONNX opset {opset}",
                                            hint="the model is corrupted or needs a newer opset") from None


def load_onnx_model(path: str | Path) -> ir.Model:
    model = load_onnx(path)
    check_ops(model, path)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        model = _upgrade(model, path, opset)
    model.metadata_props.setdefault("lowbit.source", Path(path).name)
    _read_sidecar_config(model, Path(path))
    return model


def _read_sidecar_config(model: ir.Model, path: Path) -> None:
    """Context length and KV head size from the config an exporter writes beside the model
    (onnxruntime-genai's ``genai_config.json``, optimum's ``config.json``), for text calibration."""
    import json

    for name in ("genai_config.json", "config.json"):
        f = path.parent / name
        if not f.is_file() or f.stat().st_size > (1 << 20):
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        inner = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
        decoder = inner.get("decoder", {}) if isinstance(inner.get("decoder"), dict) else {}
        context = inner.get("context_length") or cfg.get("max_position_embeddings") or cfg.get("n_positions")
        head = decoder.get("head_size") or cfg.get("head_dim")
        if not head and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            head = cfg["hidden_size"] // cfg["num_attention_heads"]
        if isinstance(context, int) and context > 0:
            model.metadata_props.setdefault("lowbit.context", str(context))
        if isinstance(head, int) and head > 0:
            model.metadata_props.setdefault("lowbit.head_size", str(head))
        return


def _upgrade(model: ir.Model, path, opset: int) -> ir.Model:
    from onnx import version_converter

    if opset < 7:
        raise ModelLoadError(f"{path}: opset {opset} is too old", hint="re-export the model with opset >= 13")
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total > (1 << 31) - (1 << 26):
        raise ModelLoadError(f"{path}: opset {opset} model over 2 GB cannot be upgraded in memory",
                             hint=f"re-export it with opset >= {MIN_OPSET}")
    logger.info("%s: upgrading opset %d -> %d", path, opset, MIN_OPSET)
    proto = ir.serde.serialize_model(model)
    try:
        proto = version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot upgrade opset {opset} to {MIN_OPSET}: {exc}",
                             hint=f"re-export the model with opset >= {MIN_OPSET}") from exc
    proto.ir_version = 10
    upgraded = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(upgraded.graph, Path(path).resolve().parent)  # not the working directory
    meta = {n.name: dict(n.metadata_props) for n in model.graph if n.name and n.metadata_props}
    for node in upgraded.graph:  # the converter drops node metadata (torch's module paths name the layers)
        if node.name in meta and not node.metadata_props:
            node.metadata_props.update(meta[node.name])
    return upgraded
