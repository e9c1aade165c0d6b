"""Passes, their registry and the manager that runs a pipeline; pipeline strings, recipes, instruments."""

from __future__ import annotations

from lowbit.passmanager.manager import (CALIBRATED, FLOAT_EQUIVALENT, LOWERED_ORT, QUANTIZED, CompileContext,
                                        Instrument, Pass, PassManager, PassResult, get_pass, register_pass,
                                        registered_passes)
from lowbit.passmanager.properties import Prop
from lowbit.passmanager import instruments as _instruments  # noqa: F401  (registers verify-each under LOWBIT_VERIFY)

__all__ = ["CALIBRATED", "Prop", "FLOAT_EQUIVALENT", "LOWERED_ORT", "QUANTIZED", "CompileContext", "Instrument", "Pass",
           "PassManager", "PassResult", "get_pass", "register_pass", "registered_passes"]
