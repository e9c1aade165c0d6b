"""Load-time fast path for ``lowbit.MatMul3Bit``: a session whose 3-bit layers run on ORT's 4-bit kernels.

The rewrite is the ``expand-3bit`` pass (:mod:`lowbit.backends.expand3`), run by the pass manager
on the in-memory model; the file on disk stays 3-bit.
"""

from __future__ import annotations

import os

import onnx_ir as ir

from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager

__all__ = ["fast_session"]


def fast_session(model: ir.Model | str | os.PathLike, accuracy_level: int = 0, **kwargs):
    """An ORT session that runs 3-bit layers on 4-bit MatMulNBits kernels (see the module doc)."""
    if not isinstance(model, ir.Model):
        model = ir.load(str(model))
    pm = PassManager.from_pipeline(f"expand-3bit{{accuracy_level={accuracy_level}}}",
                                   CompileContext(show_progress=False))
    return make_session(pm.run(model), **kwargs)
