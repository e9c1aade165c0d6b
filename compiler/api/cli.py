"""The ``lowbit`` command line.  Each subcommand is a module ``lowbit.api.commands.<name>`` exposing
``register(subparsers)`` (found automatically); a :class:`LowbitError` becomes a clear message and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from lowbit.errors import LowbitError

__all__ = ["main", "commands", "emit"]

_FIRST = ("compile", "eval", "inspect")  # shown first in --help; the rest alphabetically


def commands() -> list[str]:
    """Every module in ``lowbit.api.commands`` is a subcommand."""
    import pkgutil

    from lowbit.api import commands as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    return [n for n in _FIRST if n in names] + [n for n in names if n not in _FIRST]


def emit(args, payload: dict, human) -> None:
    """Print ``payload`` as JSON with --json, else call ``human()`` to render it."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        human()


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description="A quantization compiler for transformers.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log pass progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands():
        importlib.import_module(f"lowbit.api.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LowbitError as exc:
        print(f"lowbit {args.command}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
