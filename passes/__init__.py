"""lowbit's rewrite passes, one per file; importing this package registers them."""

from . import dyadic, integer_lut, migrate_steps, quantize, smooth  # noqa: F401
