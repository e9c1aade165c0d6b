"""Pipeline strings: ``fold-norms,smooth{alpha=0.5},quantize{weights=8,acts=8}``.

Grammar::

    pipeline := item ("," item)*
    item     := name ["{" [option ("," option)*] "}"]
    option   := key "=" value          value := int | float | true | false | bare-word

A parsed pipeline prints back identically (``str(parse(s)) == s`` for any canonical ``s``):
options keep the order they were written in and values print in their canonical form.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field

from lowbit.errors import PipelineError

__all__ = ["PipelineItem", "Pipeline", "parse_pipeline", "build_options", "format_value"]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_WORD = re.compile(r"[A-Za-z0-9_.+\-/:|*]+")


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text
    return str(value)


def _parse_value(text: str):
    if text == "true":
        return True
    if text == "false":
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if not _WORD.fullmatch(text):
        raise PipelineError(f"option value '{text}' has characters a pipeline string cannot hold")
    return text


@dataclass(frozen=True)
class PipelineItem:
    name: str
    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{k}={format_value(v)}" for k, v in self.options)
        return f"{self.name}{{{inner}}}"


@dataclass(frozen=True)
class Pipeline:
    items: tuple[PipelineItem, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def parse_pipeline(text: str) -> Pipeline:
    """Parse a pipeline string; errors point at the offending column."""
    if not isinstance(text, str) or not text.strip():
        raise PipelineError("empty pipeline string", hint="name a recipe (e.g. 'w8a8') or list passes")
    text = text.strip()
    items: list[PipelineItem] = []
    pos = 0

    def fail(msg: str):
        raise PipelineError(f"pipeline '{text}', column {pos + 1}: {msg}")

    while True:
        m = _NAME.match(text, pos)
        if not m:
            fail("expected a pass name (kebab-case, e.g. 'smooth')")
        name = m.group(0)
        pos = m.end()
        options: list[tuple[str, object]] = []
        if pos < len(text) and text[pos] == "{":
            close = text.find("}", pos)
            if close < 0:
                fail(f"unclosed '{{' after '{name}'")
            body = text[pos + 1 : close]
            seen = set()
            for part in [p for p in body.split(",")] if body.strip() else []:
                if "=" not in part:
                    fail(f"option '{part}' of '{name}' must be key=value")
                key, value = (s.strip() for s in part.split("=", 1))
                if not _KEY.fullmatch(key):
                    fail(f"bad option name '{key}' in '{name}'")
                if key in seen:
                    fail(f"option '{key}' given twice to '{name}'")
                seen.add(key)
                if not value:
                    fail(f"option '{key}' of '{name}' has no value")
                options.append((key, _parse_value(value)))
            pos = close + 1
        items.append(PipelineItem(name, tuple(options)))
        if pos == len(text):
            break
        if text[pos] != ",":
            fail(f"expected ',' or end after '{name}', found '{text[pos]}'")
        pos += 1
    return Pipeline(tuple(items))


def build_options(pass_name: str, options_cls, given: typing.Iterable[tuple[str, object]]):
    """Instantiate a frozen Options dataclass from parsed ``key=value`` pairs, with type checks."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}
    kwargs = {}
    for key, value in given:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PipelineError(f"pass '{pass_name}' has no option '{key}' (options: {known})")
        kwargs[key] = _coerce(pass_name, key, value, hints.get(key))
    try:
        return options_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise PipelineError(str(exc)) from exc


def _coerce(pass_name: str, key: str, value, hint):
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    origin_literal = typing.get_origin(hint) is typing.Literal
    if origin_literal:
        if value not in typing.get_args(hint):
            raise PipelineError(
                f"{pass_name}: option '{key}' must be one of {list(typing.get_args(hint))}, got {format_value(value)}"
            )
        return value
    for typ in allowed:
        if typ is type(None):
            if value == "none":
                return None
            continue
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan/inf reach no solver or quantizer
                raise PipelineError(f"{pass_name}: option '{key}' must be a finite number, got {format_value(value)}")
            return float(value)
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) else format_value(value)
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise PipelineError(f"{pass_name}: option '{key}' expects {names}, got '{format_value(value)}'")
