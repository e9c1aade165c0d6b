"""lowbit: a quantization compiler for transformers on one ONNX IR."""

from __future__ import annotations

from .errors import LowbitError

__all__ = ["LowbitError", "__version__"]
__version__ = "0.1.0"
