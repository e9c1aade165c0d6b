"""lowbit's rewrite passes, one per file; importing this package registers them."""

from . import dyadic, migrate_steps, quantize, smooth  # noqa: F401
