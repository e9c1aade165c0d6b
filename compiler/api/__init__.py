"""The user-facing surface: ``lowbit.compile`` (:mod:`.driver`), the CLI (:mod:`.cli`, one module per
subcommand in :mod:`.commands`), compile reports and the device-export manifest.  The only layer
that may import :mod:`lowbit.runtime`."""

from __future__ import annotations

from lowbit.api.driver import CompileResult, compile

__all__ = ["CompileResult", "compile"]
