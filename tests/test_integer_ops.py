"""lowbit.Requantize: numpy reference vs exact integer arithmetic, ORT body vs reference (bit for bit)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ops.registry import OPS
from lowbit.ops.integer_ops import QRANGE, dyadic, emit_requantize, requantize_reference
from lowbit.ir.sessions import make_session


def _exact(acc, b, c, zp):
    """Python big-int requantize: floor((acc*b + 2^(c-1)) / 2^c) + zp, saturated."""
    lo, hi = QRANGE[zp.dtype]
    out = np.empty(acc.shape, zp.dtype)
    bb, cc = np.broadcast_to(b, acc.shape), np.broadcast_to(c, acc.shape)
    for idx in np.ndindex(acc.shape):
        v = (int(acc[idx]) * int(bb[idx]) + (1 << (int(cc[idx]) - 1))) >> int(cc[idx])
        out[idx] = min(hi, max(lo, v + int(zp)))
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_reference_matches_big_integers(dtype):
    rng = np.random.default_rng(1)
    acc = rng.integers(-2 ** 31, 2 ** 31, (40, 16)).astype(np.int32)
    acc[0, :4] = [-2 ** 31, 2 ** 31 - 1, 0, -1]
    b, c, _ = dyadic(rng.uniform(1e-9, 2.0, 16))
    zp = np.asarray(3 if dtype != np.int8 else -5, dtype)
    assert np.array_equal(requantize_reference(acc, b, c, zp), _exact(acc, b, c, zp))


def test_rounding_is_half_up_at_ties():
    acc = np.array([-3, -2, -1, 1, 2, 3], np.int32)  # ×1 >> 1: ties at odd values
    got = requantize_reference(acc, np.int64(1), np.int64(1), np.asarray(0, np.int8))
    assert got.tolist() == [-1, -1, 0, 1, 1, 2]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_ort_body_is_bit_exact(dtype, shared):
    rng = np.random.default_rng(2)
    n = 32
    acc = ir.Value(name="acc", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["m", n]))
    graph = ir.Graph([acc], [], nodes=[], opset_imports={"": 21}, name="g")
    b, c, _ = dyadic(rng.uniform(1e-4, 0.9, n), shared_shift=shared)  # c + bits <= 60: the short body
    assert (np.unique(c).size == 1) == shared
    zp = np.asarray(rng.integers(*QRANGE[np.dtype(dtype)]) // 2, dtype)
    offset = rng.integers(-1000, 1000, n).astype(np.int32)  # folded (acc + offset) as dyadic emits it
    graph.outputs.append(emit_requantize(graph, acc, b, c, zp, origin="test", name="rq", offset=offset))
    sess = make_session(ir.Model(graph, ir_version=10))
    for lo, hi in ((-2 ** 31 + 1000, 2 ** 31 - 1000), (-20000, 20000), (-300, 300)):
        a = rng.integers(lo, hi, (500, n)).astype(np.int32)
        got = sess.run(None, {"acc": a})[0]
        want = requantize_reference(a + offset, b, c, zp)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_dyadic_error_bound_and_range():
    m = np.geomspace(1e-9, 4.0, 200)
    b, c, err = dyadic(m, bits=30)
    assert np.all(b < 2 ** 30) and np.all(b >= 2 ** 29) and err <= 2.0 ** -29
    assert np.allclose(b / np.exp2(c), m, rtol=2.0 ** -29)
    _, _, err16 = dyadic(m, bits=16)
    assert 2.0 ** -20 < err16 <= 2.0 ** -15
    with pytest.raises(ValueError):
        dyadic(np.array([0.0]))


def test_reference_refuses_out_of_contract_operands():
    acc = np.zeros(4, np.int32)
    with pytest.raises(ValueError):
        requantize_reference(acc, np.int64(2 ** 30), np.int64(3), np.asarray(0, np.int8))
    with pytest.raises(TypeError):
        requantize_reference(acc.astype(np.int64), np.int64(5), np.int64(3), np.asarray(0, np.int8))
    assert "Requantize" in OPS and "saturate" not in OPS
