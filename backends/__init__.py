"""Backends: lowering to ONNX Runtime (and TVM, imported lazily)."""

from . import ort  # noqa: F401  (registers lower-ort)
