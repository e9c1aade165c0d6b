"""``expand-grid`` and ``lower-nbits`` on the grid form (``lowbit.MatMulGrid``, w2a16/w3a16's linears).

ORT runs MatMulGrid's function body, which unpacks the weight on every call; ``expand-grid`` (run by
``fast_session``) folds it to a float MatMul: the same outputs as the function body (float32 weight built by the
same operations; only the summation order differs), and ``lower-nbits`` names each such layer (``slow=warn``)
or refuses (``slow=error``).  The reference weight is computed here from the file's arrays with numpy.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.backends.expand_grid import expand_grid
from lowbit.errors import LowbitError
from lowbit.ir.sessions import make_session
from lowbit.ops.grid_ops import unpack_codes
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.mod import GRIDS
from lowbit.runtime.fastpath import fast_session


def _grid_model(bits, group, scale_dtype, k=72, n=24, then=""):
    rng = np.random.default_rng(bits + group)
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, k]))
    wv = ir.Value(name="w", const_value=ir.tensor(w), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]))
    node = ir.node("MatMul", [x, wv], name="lin")
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), \
        ir.Shape([2, n])
    model = ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[wv], opset_imports={"": 21}),
                     ir_version=10)
    pipe = f"quantize-weights{{bits={bits},group={group},dtype=mod,scale_dtype={scale_dtype}}}" + then
    return PassManager.from_pipeline(pipe, CompileContext(show_progress=False)).run(model)


def _weight(model, bits, group, k):
    """W = s·L_t[q] from the file's arrays (numpy, the module doc of lowbit.quant.mod_graph)."""
    node = next(nd for nd in model.graph if nd.op_type == "MatMulGrid")
    prefix = node.inputs[1].name.rsplit(".", 1)[0] + "."  # <linear>.weight_q
    arr = {name[len(prefix):]: v.const_value.numpy() for name, v in model.graph.initializers.items()
           if name.startswith(prefix)}
    nb, _, n = arr["weight_scale"].shape
    q = unpack_codes(arr["weight_q"], bits, nb * group * n).reshape(nb, group, n)
    s = arr["weight_scale"].astype(np.float64) * arr.get("weight_scale_step", np.ones(1)).astype(np.float64)
    t = arr["weight_dtype"].astype(np.int64)
    return (GRIDS[bits][t, q] * s).reshape(-1, n)[:k]


@pytest.mark.parametrize("bits,group,scale_dtype", [(2, 8, "uint8"), (3, 16, "uint8"), (3, 32, "float16"),
                                                    (2, 16, "float32")])
def test_expand_grid_is_the_function_body(bits, group, scale_dtype):
    model = _grid_model(bits, group, scale_dtype)
    x = np.random.default_rng(1).standard_normal((2, 72)).astype(np.float32)
    body, = make_session(model).run(None, {"x": x})
    want = x.astype(np.float64) @ _weight(model, bits, group, 72)
    fast, = fast_session(_grid_model(bits, group, scale_dtype)).run(None, {"x": x})
    assert np.allclose(body, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.allclose(fast, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert expand_grid(model) == 1
    assert [n.op_type for n in model.graph] == ["MatMul"] and len(model.graph.initializers) == 1


def test_lower_nbits_names_function_body_layers(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.backends.nbits"):
        _grid_model(2, 8, "uint8", then=",lower-nbits")
    assert "lin" in caplog.text and "MatMulGrid: function body" in caplog.text and "expand-grid" in caplog.text
    with pytest.raises(LowbitError, match="MatMulGrid runs its ONNX function body"):
        _grid_model(2, 8, "uint8", then=",lower-nbits{slow=error}")
