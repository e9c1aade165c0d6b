"""integer-exits: an 8-bit Requantize read only through DequantizeLinear becomes int16 on the same range.

Reference: the real value the 8-bit form stands for, ``clip(acc·b/2^c, (qmin − z)·s, (qmax − z)·s)``
in float64 (written from the identity, not from the code under test); the int16 form must land within
half its step (s/257/2) of it, plus the multiplier's and the float32 step's rounding, and saturate at
the same ends.  The tiny RoPE Llama: Q/K/V of every layer are widened, the reference interpreter equals ORT
bit for bit, and the logits move closer to the QDQ graph than the 8-bit exits leave them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ops.integer_ops import QRANGE, dyadic, requantize_reference, widened_requantize


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("shared", [True, False])
def test_widened_requantize_matches_the_real_value(dtype, shared):
    rng = np.random.default_rng(3)
    n = 24
    m = rng.uniform(1e-6, 3e-3, n)
    b, c, _ = dyadic(m, 30, shared_shift=shared)
    lo, hi = QRANGE[np.dtype(dtype)]
    z = np.asarray(rng.integers(lo + 20, hi - 20), dtype)
    s = np.float32(0.037)
    acc = rng.integers(-400_000, 400_000, (300, n)).astype(np.int32)
    acc[:3] = [[-2 ** 31 + 1] * n, [2 ** 31 - 1] * n, [0] * n]
    b2, c2, z2, s2 = widened_requantize(b, c, z, s)
    assert z2.dtype == np.int16 and np.all(b2 < 2 ** 30) and b2.max() >= 2 ** 28
    q16 = requantize_reference(acc, b2, c2, z2)
    real = acc.astype(np.float64) * (b / np.exp2(c.astype(np.float64)))  # in 8-bit step units
    want = np.clip(real, lo - float(z), hi - float(z)) * float(s)
    got = (q16.astype(np.float64) - float(z2)) * float(s2)
    # half an int16 step, the multiplier's 30-bit rounding, and the float32 rounding of the step s/257
    tol = (float(s) / 257 / 2 + np.abs(want) * 2.0 ** -28
           + np.abs(q16.astype(np.float64) - float(z2)) * abs(float(s2) - float(s) / 257) + 1e-12)
    assert np.all(np.abs(got - want) <= tol)


@pytest.fixture(scope="module")
def tiny():
    from test_integer_tiny import CFG, INTEGER, QDQ, _model

    from lowbit.passmanager.manager import CompileContext, PassManager

    rng = np.random.default_rng(0)
    calib = [{"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)} for _ in range(16)]
    probe = {"tokens": rng.integers(0, CFG.vocab_size, (1, 16)).astype(np.int64)}
    run = lambda pipe: PassManager.from_pipeline(pipe, CompileContext(calibration=calib, show_progress=False)).run(
        _model())
    assert INTEGER.endswith(",integer-exits")
    ctx = CompileContext(calibration=calib, show_progress=False)
    wide = PassManager.from_pipeline(INTEGER, ctx).run(_model())
    return CFG, run(QDQ), run(INTEGER.removesuffix(",integer-exits")), wide, ctx.report, probe


def test_rope_attention_inputs_are_widened_bit_exact(tiny):
    from lowbit.runtime.reference import compare_graph_with_ort

    cfg, _, _, wide, report, probe = tiny
    assert report["integer-exits"]["widened"] == 3 * cfg.n_layers  # Q, K, V of each RoPE attention
    rq16 = [n for n in wide.graph if n.op_type == "Requantize" and n.outputs[0].dtype == ir.DataType.INT16]
    assert len(rq16) >= 3 * cfg.n_layers
    compared, mismatches = compare_graph_with_ort(wide, [probe])
    assert compared > 50 and not mismatches, mismatches


def test_widened_exits_bring_the_logits_closer_to_the_qdq_graph(tiny):
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.ir.sessions import make_session
    from lowbit_models import rel_err

    _, qdq, narrow, wide, _, probe = tiny
    want = make_session(qdq, optimize=False).run(None, probe)[0]
    errs = []
    for m in (narrow, wide):
        m = ir.serde.deserialize_model(ir.serde.serialize_model(m))
        LowerLowbit()(m)
        errs.append(rel_err(make_session(m, optimize=False).run(None, probe)[0], want))
    assert errs[1] < errs[0], errs
