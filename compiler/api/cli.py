"""The ``lowbit`` command line.  Each subcommand is a module ``lowbit.api.commands.<name>`` exposing
``register(subparsers)`` (found automatically); a :class:`LowbitError` becomes a clear message and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys


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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``lowbit CMD: error: ... (see 'lowbit CMD --help')``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = _Parser(prog="lowbit", description="A quantization compiler for transformers.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log pass progress (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands():
        importlib.import_module(f"lowbit.api.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Exit codes: 0 success, 1 a finding (audit), 2 a user error (one ``error:`` line),
    3 an internal error (one line naming a crash report), 130/143 interrupted/terminated."""
    from lowbit.api.boundary import Terminated, handle_sigterm, one_line, to_lowbit_error

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    handle_sigterm()
    command = ["lowbit", *(sys.argv[1:] if argv is None else argv)]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted (nothing was written)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lowbit {args.command}: terminated (nothing was written)", file=sys.stderr)
        return 143
    except BaseException as exc:  # noqa: BLE001 — the one error boundary of the command line
        if isinstance(exc, SystemExit):
            raise
        err = to_lowbit_error(exc, command)
        hint = f" (hint: {one_line(err.hint)})" if err.hint else ""
        print(f"lowbit {args.command}: error: {one_line(err.message)}{hint}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
