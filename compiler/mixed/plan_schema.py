"""The schema of a saved mixed-precision plan (JSON), checked before a plan is used.

A missing key, a wrong type or an impossible value is refused naming the key path
(``layers[3].bits``) instead of surfacing later as a ``KeyError``/``TypeError`` deep in a pass.
"""

from __future__ import annotations

import math

from lowbit.errors import InputError

__all__ = ["check_plan_dict"]

_BITS = (2, 3, 4, 8, 16)


def _fail(where: str, what: str, source: str) -> InputError:
    return InputError(f"{source}: not a readable lowbit plan: {where} {what}",
                      hint="plans are JSON written by assign-bits{save=PATH}; fix the entry or re-create the plan")


def _int(d: dict, key: str, where: str, source: str, lo: int = 0) -> None:
    if key not in d:
        raise _fail(f"{where}", f"has no key '{key}'", source)
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{where}.{key}", f"must be a whole number, got {type(v).__name__} {v!r:.40}", source)
    if v < lo:
        raise _fail(f"{where}.{key}", f"must be >= {lo}, got {v}", source)


def _num(d: dict, key: str, where: str, source: str, optional: bool = True) -> None:
    if key not in d:
        if optional:
            return
        raise _fail(where, f"has no key '{key}'", source)
    v = d[key]
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(f"{where}.{key}", f"must be a finite number, got {v!r:.40}", source)


def check_plan_dict(d, source: str = "plan") -> None:
    if not isinstance(d, dict):
        raise _fail("the file", f"holds a JSON {type(d).__name__}, not an object", source)
    if "layers" not in d:
        raise _fail("the plan", "has no key 'layers'", source)
    if not isinstance(d["layers"], list):
        raise _fail("layers", f"must be a list, got {type(d['layers']).__name__}", source)
    for key, typ in (("budget", str), ("estimator", str), ("model", str), ("extra", dict)):
        if key in d and not isinstance(d[key], typ):
            raise _fail(key, f"must be a {typ.__name__}, got {type(d[key]).__name__}", source)
    _num(d, "target", "the plan", source)
    for key in ("fixed_bytes", "graph_bytes"):
        if key in d:
            _int(d, key, "the plan", source)
    known = {"name", "shape", "bits", "group", "bytes", "est_error", "measured_error", "split"}
    for i, lp in enumerate(d["layers"]):
        where = f"layers[{i}]"
        if not isinstance(lp, dict):
            raise _fail(where, f"must be an object, got {type(lp).__name__}", source)
        extra = sorted(set(lp) - known)
        if extra:
            raise _fail(where, f"has unknown key(s) {extra} (known: {sorted(known)})", source)
        if not isinstance(lp.get("name"), str) or not lp["name"]:
            raise _fail(where, "has no 'name' string", source)
        where = f"layers[{i}] ('{lp['name']}')"
        shape = lp.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
            raise _fail(f"{where}.shape", f"must be [K, N] with two positive whole numbers, got {shape!r:.60}", source)
        _int(lp, "bits", where, source, lo=1)
        if lp["bits"] not in _BITS:
            raise _fail(f"{where}.bits", f"must be one of {list(_BITS)}, got {lp['bits']}", source)
        _int(lp, "group", where, source, lo=0)
        g = lp["group"]
        if g and (g & (g - 1) or g < (8 if lp["bits"] in (2, 3) else 16)):  # 8: the 2/3-bit grid form only
            raise _fail(f"{where}.group", f"must be 0 (per channel) or a power of two >= 16 (>= 8 at 2 and 3 bits), "
                        f"got {g}", source)
        _int(lp, "bytes", where, source, lo=0)
        _num(lp, "est_error", where, source)
        _num(lp, "measured_error", where, source)
        split = lp.get("split")
        if split is not None:
            if not isinstance(split, dict):
                raise _fail(f"{where}.split", "must be an object or null", source)
            for key in ("bits", "group", "bytes"):
                _int(split, key, f"{where}.split", source)
            cols = split.get("columns")
            if not isinstance(cols, list) or not all(isinstance(c, int) and 0 <= c < shape[1] for c in cols):
                raise _fail(f"{where}.split.columns", f"must be a list of output columns in [0, {shape[1]})", source)
