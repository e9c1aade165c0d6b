"""PyTorch ``nn.Module`` → ``ir.Model`` through the dynamo exporter (``torch.onnx.export(dynamo=True)``).

Weights stay inline (``external_data=False``) below 2 GB; dynamic axes come from
``dynamic_shapes``.  The exported opset is 21 (int4 QDQ needs it; 23 would turn SDPA into the
``Attention`` op, which TVM cannot import).
"""

from __future__ import annotations

import contextlib
import io
import logging

import onnx_ir as ir

from lowbit.errors import UnsupportedModelError

__all__ = ["export_module"]

logger = logging.getLogger(__name__)


def export_module(module, args: tuple, *, input_names: list[str], output_names: list[str],
                  dynamic_shapes=None, opset: int = 21, metadata: dict[str, str] | None = None) -> ir.Model:
    import warnings

    import torch

    module = module.eval()
    sink = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes are noise here
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, external_data=False,
                                        dynamic_shapes=dynamic_shapes, input_names=input_names,
                                        output_names=output_names, verbose=False)
    except Exception as exc:
        onnx_logger.setLevel(level)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UnsupportedModelError(f"torch.onnx.export (dynamo) failed on {type(module).__name__}: {first}",
                                    hint="export the model to ONNX yourself and pass the .onnx file") from exc
    onnx_logger.setLevel(level)
    model = program.model  # an onnx_ir Model already
    model.ir_version = 10
    for k, v in (metadata or {}).items():
        model.metadata_props[k] = v
    return model
