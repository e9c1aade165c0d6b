"""lowbit: a quantization compiler for transformers on one ONNX IR."""

from __future__ import annotations

from .api import CompileResult, compile
from .errors import LowbitError
from .frontends import load_model
from .model_io import load_onnx, save_onnx
from .passmanager import CompileContext, Pass, PassManager, get_pass, register_pass, registered_passes
from .pipeline import parse_pipeline
from .recipes import RECIPES

__all__ = ["compile", "CompileResult", "LowbitError", "load_model", "load_onnx", "save_onnx", "Pass",
           "PassManager", "CompileContext", "register_pass", "get_pass", "registered_passes", "parse_pipeline",
           "RECIPES", "__version__"]
__version__ = "0.1.0"
