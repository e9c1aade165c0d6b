"""lower-nbits picks ORT's fast MatMulNBits kernel per bit width and names layers that would run its slow one.

ORT 1.31 runs 2- and 8-bit MatMulNBits at accuracy level 0 with a reference kernel (TOOLCHAIN.md:
25–35× slower than fp32; the shipped latency table measured several hundred times slower than level 4),
and 4-bit at level 0 with a fast exact kernel.  So ``auto`` must write 2→4, 4→0, 8→4.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from lowbit.backends.ort_levels import choose_level, is_slow, level_table
from lowbit.errors import LowbitError
from lowbit.ir.sessions import make_session
from lowbit.passmanager import CompileContext, PassManager


def _mlp(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    inits = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [64, 64], rng.standard_normal((64, 64)).astype(np.float32)
                                .ravel()) for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="up"), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mid"), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="down")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return ir.serde.deserialize_model(m)


def _lower(bits: int, lower: str) -> ir.Model:
    ctx = CompileContext()
    return PassManager.from_pipeline(f"quantize-weights{{bits={bits},group=32,method=rtn}},{lower}", ctx).run(_mlp())


def _levels(model: ir.Model) -> list[int]:
    return [n.attributes["accuracy_level"].as_int() for n in model.graph if n.op_type == "MatMulNBits"]


def test_table_marks_level0_slow_for_2_and_8_bits_only():
    assert set(level_table()) == {2, 4, 8}
    assert is_slow(2, 0) and is_slow(8, 0)
    assert not is_slow(4, 0) and not any(is_slow(b, 4) for b in (2, 4, 8))


@pytest.mark.parametrize("bits,level", [(2, 4), (4, 0), (8, 4)])
def test_auto_writes_the_fast_level(bits, level):
    lowered = _lower(bits, "lower-nbits")
    assert _levels(lowered) == [level] * 3
    assert choose_level(bits, "fastest") == 4  # int8 activations are ORT's fastest kernel at every width
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    exact = make_session(_lower(bits, "lower-nbits{accuracy_level=0,slow=allow}")).run(None, {"x": x})[0]
    fast = make_session(lowered).run(None, {"x": x})[0]
    if level == 0:
        np.testing.assert_array_equal(fast, exact)
    else:  # int8 activations per block: close to the float-activation result, not equal
        np.testing.assert_allclose(fast, exact, rtol=0, atol=0.05 * np.abs(exact).max())


def test_forced_slow_level_is_refused_naming_the_layer():
    with pytest.raises(LowbitError, match="node 'up'.*2-bit MatMulNBits at accuracy_level=0"):
        _lower(2, "lower-nbits{accuracy_level=0,slow=error}")


def test_forced_slow_level_warns_naming_the_layers(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.backends.nbits"):
        lowered = _lower(8, "lower-nbits{accuracy_level=0}")
    assert _levels(lowered) == [0, 0, 0]
    assert "3 layer(s)" in caplog.text and "up (8-bit, level 0)" in caplog.text and "down" in caplog.text


def test_bad_level_refused():
    with pytest.raises(Exception, match="accuracy_level must be auto, fastest or 0..4"):
        _lower(4, "lower-nbits{accuracy_level=7}")
