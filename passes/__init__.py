"""lowbit's rewrite passes, one per file; importing this package registers them."""

from . import canonicalize, quantize, smooth  # noqa: F401
