"""One error family for everything lowbit refuses.

Every error says what was wrong, where (file, pass, node, op) and what to do about it.  The CLI
turns a :class:`LowbitError` into a one-paragraph message and a non-zero exit code; anything
else escaping lowbit is a bug.
"""

from __future__ import annotations

__all__ = [
    "LowbitError",
    "ModelLoadError",
    "PipelineError",
    "PassFailure",
    "CalibrationError",
    "UnsupportedModelError",
    "InvalidWeightsError",
    "InputError",
    "NumericalError",
    "InternalError",
]


class LowbitError(Exception):
    """Base of all errors lowbit raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ModelLoadError(LowbitError):
    """The model file cannot be read (missing, truncated, not ONNX, unsafe external data)."""


class PipelineError(LowbitError):
    """A recipe or pipeline string is malformed, names an unknown pass or has bad options."""


class PassFailure(LowbitError):
    """A pass failed on a model; names the pass and, where known, the node."""

    def __init__(self, pass_name: str, message: str, *, node: str | None = None, hint: str | None = None):
        where = f"pass '{pass_name}'" + (f", node '{node}'" if node else "")
        self.pass_name = pass_name
        self.node = node
        super().__init__(f"{where}: {message}", hint=hint)


class CalibrationError(LowbitError):
    """Calibration data does not fit the model (names, dtypes, shapes) or is empty."""


class UnsupportedModelError(LowbitError):
    """The model has a structure or op that the requested transformation cannot handle."""


class InvalidWeightsError(LowbitError):
    """Weights hold NaN/Inf or a quantization would divide by an all-zero channel."""


class InputError(LowbitError):
    """A file or option the user gave is unusable (missing, unreadable, not a regular file, badly encoded,
    out of range); the message names the file or option and what to do."""


class NumericalError(LowbitError):
    """The requested arithmetic would be silently wrong (an int32 accumulator that can wrap, a non-finite
    output); the message names the layer."""


class InternalError(LowbitError):
    """A lowbit bug, not a user mistake: exit code 3, with a crash report written to a temp file."""

    exit_code = 3
