"""Command-line option types that validate at the door: ranges (NaN and ±inf refused), slices, encodings.

Each is an ``argparse`` ``type=`` callable; a bad value becomes argparse's one-line
``lowbit CMD: error: argument --x: ...`` and exit code 2, before anything is loaded.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["int_range", "float_range", "story_slice", "encoding", "StorySlice"]


def int_range(lo: int | None = None, hi: int | None = None):
    """An int in [lo, hi] (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expects a whole number, got '{text}'") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi)}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """A finite float in [lo, hi] ((lo, hi] with ``lo_open``); NaN and ±inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expects a number, got '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_range(lo, hi, lo_open)}, got {value:g}")
        return value

    parse.__name__ = "float"
    return parse


def _range(lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"> {lo}" if lo_open else f">= {lo}"
    return f"<= {hi}"


class StorySlice:
    """``A:B`` with 0 <= A < B (either may be left out): a non-empty range of stories."""

    def __init__(self, start: int | None, stop: int | None):
        self.start, self.stop = start, stop

    def slice(self) -> slice:
        return slice(self.start, self.stop)

    def __repr__(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


def story_slice(text: str) -> StorySlice:
    a, sep, b = str(text).partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expects A:B (e.g. 600:785 or 10:), got '{text}'")
    try:
        start = int(a) if a.strip() else None
        stop = int(b) if b.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects A:B with whole numbers (e.g. 600:785), got '{text}'") from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise argparse.ArgumentTypeError(f"story indices must be >= 0, got '{text}'")
    if start is not None and stop is not None and stop <= start:
        raise argparse.ArgumentTypeError(f"'{text}' selects no story (B must be greater than A)")
    return StorySlice(start, stop)


def encoding(text: str) -> str:
    import codecs

    try:
        return codecs.lookup(text).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown text encoding '{text}' (try utf-8, utf-16, latin-1, cp1252)") from None
