"""Passes run straight through ``PassManager`` (not ``lowbit.compile``, whose frontend infers value
types) on a model whose intermediate values carry no types: they work, or the pass that would leave
an unserializable ``Tensor(None)`` type is named in a one-line refusal (it used to surface as an
internal serde error in the NEXT pass: migrate-steps' norm clone copied the missing dtype and
dyadic's calibration session crashed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lowbit.errors import PassFailure
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, Pass, PassManager, PassResult
from test_integer_tiny import INTEGER, _post_norm_encoder


def _untyped(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto.graph.value_info[:]
    return proto


def test_integer_passes_run_on_an_untyped_model_and_give_the_typed_result():
    proto, calib, probe = _post_norm_encoder("Mul")
    bare = _untyped(proto)
    assert not bare.graph.value_info and len(bare.graph.node) > 20
    typed = PassManager.from_pipeline(INTEGER, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(proto))
    untyped = PassManager.from_pipeline(INTEGER, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(bare))
    from lowbit.backends.lower_lowbit import LowerLowbit

    outs = []
    for m in (typed, untyped):
        LowerLowbit()(m)
        outs.append(make_session(m, optimize=False).run(None, probe)[0])
    np.testing.assert_array_equal(outs[1], outs[0])


def test_a_pass_that_leaves_a_typeless_tensor_type_is_named():
    @dataclass(frozen=True)
    class _Opts:
        pass

    class CopiesAMissingDtype(Pass):
        name = "copies-a-missing-dtype"
        Options = _Opts

        def call(self, model):
            node = next(iter(model.graph))
            node.outputs[0].dtype = None  # what `out.dtype = untyped.dtype` does: Tensor(None)
            return PassResult(model, modified=True)

    proto, calib, _ = _post_norm_encoder("Mul")
    model = ir.serde.deserialize_model(_untyped(proto))
    with pytest.raises(PassFailure, match=r"pass 'copies-a-missing-dtype'.*unknown element type") as exc:
        PassManager([CopiesAMissingDtype()], CompileContext(calibration=calib, show_progress=False)).run(model)
    assert "canonicalize" in exc.value.hint and "\n" not in exc.value.message
