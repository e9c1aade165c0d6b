"""Backends: lowering to ONNX Runtime (and TVM, imported lazily)."""

from . import nbits, ort  # noqa: F401  (registers lower-nbits, lower-ort)
