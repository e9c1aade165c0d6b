"""Edges that mutation testing found unguarded: an option at its boundary, an op written with its
default attribute left out.  Expected values are written here (numpy, the ONNX spec's defaults)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit_models import random_llama, tokens
from onnx_text import parse, run


def test_a_transpose_without_perm_is_folded_like_perm_1_0():
    """ONNX: Transpose without ``perm`` reverses the axes, i.e. perm = [1, 0] for a matrix."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"""g (float[b, 3] x) => (float[b, 4] y) <float[4, 3] w = {{{vals}}}> {{
        wt = Transpose (w)
        y = MatMul (x, wt) }}""")
    out, pm = run(model, "canonicalize")
    assert [n.op_type for n in out.graph] == ["MatMul"]
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(make_session(out, optimize=False).run(None, {"x": x})[0], x @ w.T, rtol=1e-6)


def test_awq_grid_of_one_is_a_valid_search():
    """grid=1 searches α ∈ {1} (plus no scaling): the smallest grid the option allows; grid=0 is refused."""
    feeds = [tokens(128, batch=1, seq=16, seed=i) for i in range(2)]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    PassManager.from_pipeline("calibrate{rows=64},awq{bits=3,group=32,grid=1}", ctx).run(
        random_llama(dim=64, hidden=96, layers=1, heads=4, kv=2, vocab=128))
    with pytest.raises(Exception, match="grid"):
        PassManager.from_pipeline("awq{grid=0}", CompileContext(show_progress=False))
