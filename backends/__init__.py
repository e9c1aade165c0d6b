"""Backends: lowering to ONNX Runtime (and TVM, imported lazily)."""

from . import ort  # noqa: F401  (registers lower-ort)
from . import lowbit_ops  # noqa: F401,E402  (registers lower-lowbit and the lowbit op domain)
