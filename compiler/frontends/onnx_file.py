"""ONNX files → ``ir.Model``: lazy, safe (see model_io), upgraded to opset ≥ 21 when older."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from ..errors import ModelLoadError
from ..model_io import load_onnx

__all__ = ["load_onnx_model", "MIN_OPSET"]

logger = logging.getLogger(__name__)
MIN_OPSET = 21  # int4 QDQ and blocked quantization need 21


def load_onnx_model(path: str | Path) -> ir.Model:
    model = load_onnx(path)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < MIN_OPSET:
        model = _upgrade(model, path, opset)
    model.metadata_props.setdefault("lowbit.source", Path(path).name)
    return model


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
    return ir.serde.deserialize_model(proto)
