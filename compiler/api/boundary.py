"""The one error boundary between lowbit and its users (CLI commands and the Python API).

* A :class:`LowbitError` passes through unchanged: it already names what and where.
* User-caused failures that escaped a more specific check — ``OSError`` on a named file,
  ``UnicodeError``, malformed JSON, ``MemoryError`` — become an :class:`InputError` (exit code 2).
* Anything else is a lowbit bug: an :class:`InternalError` (exit code 3) whose one-line message
  names a crash report (traceback, command, versions) written to a temp file.
* SIGTERM is turned into :class:`Terminated` so that ``finally`` blocks (temp folders) run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import traceback

from lowbit.errors import InputError, InternalError, LowbitError

__all__ = ["guard", "boundary", "to_lowbit_error", "crash_report", "Terminated", "handle_sigterm", "one_line"]

logger = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup runs; exit code 143."""


def handle_sigterm() -> None:
    def _raise(signum, frame):
        raise Terminated(signum)

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _raise)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("lowbit", "onnx", "onnx_ir", "onnxruntime", "numpy"):
        m = sys.modules.get(mod)
        out[mod] = getattr(m, "__version__", "?") if m else "not imported"
    return out


def crash_report(exc: BaseException, command: list[str] | str | None = None) -> str:
    """Write the traceback, command and versions to a temp file; returns its path ('' if it cannot)."""
    try:
        fd, path = tempfile.mkstemp(prefix="lowbit-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"command: {command if command is not None else sys.argv}\n")
            f.write(f"versions: {json.dumps(_versions())}\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except Exception:  # the report is a courtesy; never hide the real error behind a failing write
        return ""


def to_lowbit_error(exc: BaseException, command=None) -> LowbitError:
    """The error a user sees for ``exc`` (which escaped every specific check)."""
    if isinstance(exc, InternalError):
        if not getattr(exc, "crash_report", None):
            exc.crash_report = crash_report(exc, command)
            if exc.crash_report:
                exc.message = f"{exc.message}; crash report: {exc.crash_report}"
                exc.args = (exc.message,)
        return exc
    if isinstance(exc, LowbitError):
        return exc
    if isinstance(exc, json.JSONDecodeError):
        return InputError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                          hint="fix the JSON file")
    if isinstance(exc, UnicodeDecodeError):
        return InputError(f"byte {exc.start} is not valid {exc.encoding}: {exc.reason}",
                          hint="convert the text to UTF-8 or pass --encoding")
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno is not None):
        from lowbit.files import os_error

        return os_error(exc, exc.filename if exc.filename is not None else "?", "file")
    if isinstance(exc, MemoryError):
        return InputError("ran out of memory", hint="use a smaller model, fewer calibration samples or shorter text")
    path = crash_report(exc, command)
    where = f"; crash report: {path}" if path else ""
    return InternalError(f"internal error {type(exc).__name__}: {one_line(exc)}{where}",
                         hint="this is a lowbit bug: please report it with the crash report")


def boundary(fn, *args, command=None, **kwargs):
    """Call ``fn``; anything but a :class:`LowbitError` is converted by :func:`to_lowbit_error`."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, Terminated, SystemExit, GeneratorExit):
        raise
    except LowbitError as exc:
        to_lowbit_error(exc, command)  # an InternalError gets its crash report
        raise
    except BaseException as exc:
        raise to_lowbit_error(exc, command) from exc


def guard(fn):
    """Decorator: the public API function ``fn`` raises only :class:`LowbitError` subclasses."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return boundary(fn, *args, command=f"{fn.__module__}.{fn.__qualname__}", **kwargs)

    return wrapper
