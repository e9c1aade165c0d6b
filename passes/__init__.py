"""lowbit's rewrite passes, one per file; importing this package registers them."""

from . import assign_bits, quantize, smooth  # noqa: F401
