"""The ``lowbit`` op domain: one registry (:mod:`.registry`) and the op definitions.

Importing this package registers every op: float ops (``MatMul3Bit``, ``Hadamard``) in
:mod:`.float_ops`, integer ops (``Requantize``, ``Lookup``) in :mod:`.integer_ops`, ``IntNorm`` and
``IntSoftmax`` in :mod:`.integer_nonlinear`, ``MatMulGrid`` in :mod:`.grid_ops`.  Each op has a
schema, a numpy reference, an ONNX function body and/or a standard-op lowering.
"""

from __future__ import annotations

from lowbit.ops import float_ops, grid_ops, integer_nonlinear, integer_ops, registry  # noqa: F401  (registers the ops)
from lowbit.ops.registry import DOMAIN, OPS, VERSION

__all__ = ["DOMAIN", "OPS", "VERSION", "float_ops", "grid_ops", "integer_nonlinear", "integer_ops", "registry"]
