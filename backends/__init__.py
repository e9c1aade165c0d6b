"""Backends: lowering lowbit's graphs to ONNX Runtime and Apache TVM (TVM imported lazily)."""

from lowbit.backends import expand3, lower_lowbit, nbits, ort  # noqa: F401  (register lower-lowbit, lower-nbits, lower-ort)
from lowbit.backends import expand_grid as _expand_grid  # noqa: F401  (registers 'expand-grid')
from lowbit.backends import tvm_lower as _tvm_lower  # noqa: F401  (registers the 'lower-tvm' pass)
from lowbit.backends import tvm_decoder as _tvm_decoder  # noqa: F401  (KV graphs in 'lower-tvm': symbolic lengths)
