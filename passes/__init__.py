"""lowbit's rewrite passes, one per file; importing this package registers them."""

from . import quantize, smooth  # noqa: F401
from . import fold_norms, quantize_acts, quantize_weights, rotate  # noqa: F401
