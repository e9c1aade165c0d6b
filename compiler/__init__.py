"""lowbit: a quantization compiler for transformers on one ONNX IR."""

from __future__ import annotations

from lowbit.api.driver import CompileResult, compile
from lowbit.errors import LowbitError
from lowbit.api.evaluate import evaluate
from lowbit.api.sources import load_model
from lowbit.ir.model_io import load_onnx, save_onnx
from lowbit.passmanager.manager import CompileContext, Pass, PassManager, get_pass, register_pass, registered_passes
from lowbit.passmanager.pipeline import parse_pipeline
from lowbit.passmanager.recipes import RECIPES

# Importing the pass packages registers every built-in pass (the manager itself imports no pass).
from lowbit import backends as _backends  # noqa: E402, F401
from lowbit import passes as _passes  # noqa: E402, F401

__all__ = ["compile", "evaluate", "CompileResult", "LowbitError", "load_model", "load_onnx", "save_onnx", "Pass",
           "PassManager", "CompileContext", "register_pass", "get_pass", "registered_passes", "parse_pipeline",
           "RECIPES", "__version__"]
__version__ = "0.1.0"
