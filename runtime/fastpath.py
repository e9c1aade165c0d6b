"""Load-time fast path for ``lowbit.MatMul3Bit`` and ``lowbit.MatMulGrid``: a session whose 3-bit layers run on
ORT's 4-bit kernels and whose grid-form layers run as float MatMuls (ORT runs either op's function body, which
unpacks the weight on every call, otherwise).

The rewrites are the ``expand-3bit`` and ``expand-grid`` passes (:mod:`lowbit.backends.expand3`,
:mod:`lowbit.backends.expand_grid`), run by the pass manager on the in-memory model; the file stays as it is.
"""

from __future__ import annotations

import os

import onnx_ir as ir

from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager

__all__ = ["fast_session"]


def fast_session(model: ir.Model | str | os.PathLike, accuracy_level: int = 0, **kwargs):
    """An ORT session that runs 3-bit layers on 4-bit MatMulNBits kernels and grid-form layers as float MatMuls
    (see the module doc)."""
    if not isinstance(model, ir.Model):
        model = ir.load(str(model))
    pm = PassManager.from_pipeline(f"expand-3bit{{accuracy_level={accuracy_level}}},expand-grid",
                                   CompileContext(show_progress=False))
    return make_session(pm.run(model), **kwargs)
