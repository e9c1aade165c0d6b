"""Passes, their registry and the manager that runs a pipeline; pipeline strings, recipes, instruments."""

from __future__ import annotations

from lowbit.passmanager.manager import (CALIBRATED, FLOAT_EQUIVALENT, LOWERED_ORT, QUANTIZED, CompileContext,
                                        Instrument, Pass, PassManager, PassResult, get_pass, register_pass,
                                        registered_passes)

__all__ = ["CALIBRATED", "FLOAT_EQUIVALENT", "LOWERED_ORT", "QUANTIZED", "CompileContext", "Instrument", "Pass",
           "PassManager", "PassResult", "get_pass", "register_pass", "registered_passes"]
