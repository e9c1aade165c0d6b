"""IR properties that passes require and ensure, and one checker per property.

A pass declares ``requires_properties`` (the manager refuses a pipeline where no earlier pass
ensures them), ``ensures_properties`` (what holds after it ran) and ``invalidates_properties``
(what it may break, e.g. a pass that replaces linear inputs drops their statistics).  The verify
instrument re-checks every ensured property on the IR itself after each pass, so a pass that
declares a property it does not deliver fails in the tests.

Properties are a ``str`` enum: ``Prop.CALIBRATED == "calibrated"``, so pipeline code and tests
that hold the plain names keep working, while the manager and the checkers dispatch on members.
"""

from __future__ import annotations

import enum
from typing import Callable

import onnx_ir as ir

__all__ = ["Prop", "CHECKS", "HOW", "check_property"]


class Prop(str, enum.Enum):
    CALIBRATED = "calibrated"  # activation statistics annotate every (float) linear input
    HESSIAN = "calibrated-hessian"  # ... and carry XᵀX (GPTQ, sensitivity)
    QUANTIZED = "quantized"  # at least one linear layer reads quantized weights (QDQ or a low-bit op)
    BITS_ASSIGNED = "bits-assigned"  # every float linear carries a lowbit.bits annotation
    LOWERED_ORT = "lowered-ort"  # ONNX Runtime loads the graph and ORT's optimizer accepts it

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__
    __hash__ = str.__hash__  # Prop.CALIBRATED and "calibrated" are one member of a set


# How to get a property when the pass that ensures it needs an option (for the manager's hints).
HOW: dict[Prop, str] = {Prop.HESSIAN: "calibrate{hessian=true}"}


def _float_linears(model: ir.Model):
    from lowbit.ir.analysis import find_linears

    return find_linears(model.graph)


def _check_calibrated(model: ir.Model, hessian: bool = False) -> str | None:
    from lowbit.quant.stats import act_stats

    for lin in _float_linears(model):
        st = act_stats(lin.input)
        if st is None:
            return f"the input of linear '{lin.name}' has no calibration statistics"
        if hessian and st.xtx is None:
            return f"the input of linear '{lin.name}' has statistics without XᵀX"
        if st.cmin.shape != (lin.shape[0],):
            return f"the statistics of '{lin.name}' have {st.cmin.shape} channels, the weight has {lin.shape[0]} rows"
    return None


_QUANTIZED_OPS = {"MatMulInteger", "MatMulNBits", "MatMul3Bit", "MatMulGrid", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "QLinearMatMul"}


def _check_quantized(model: ir.Model) -> str | None:
    for node in model.graph:
        if node.op_type in _QUANTIZED_OPS:
            return None
        if node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is not None:
            prod = node.inputs[1].producer()
            if prod is not None and prod.op_type == "DequantizeLinear":
                return None
    return "no linear layer reads quantized weights (no DequantizeLinear weight, integer or low-bit matmul)"


def _check_bits_assigned(model: ir.Model) -> str | None:
    for lin in _float_linears(model):
        if "lowbit.bits" not in lin.node.metadata_props:
            return f"linear '{lin.name}' has no lowbit.bits annotation"
    return None


def _check_lowered_ort(model: ir.Model) -> str | None:
    from lowbit.ir.sessions import make_session, needs_file

    if needs_file(model):
        return None  # too large to load twice per pass; the driver's final run checks it
    try:
        make_session(model, optimize=True)
    except Exception as exc:  # noqa: BLE001 - any ORT refusal is a violation
        return f"ONNX Runtime refuses the graph: {str(exc).splitlines()[0][:200]}"
    return None


CHECKS: dict[Prop, Callable[[ir.Model], str | None]] = {
    Prop.CALIBRATED: _check_calibrated,
    Prop.HESSIAN: lambda m: _check_calibrated(m, hessian=True),
    Prop.QUANTIZED: _check_quantized,
    Prop.BITS_ASSIGNED: _check_bits_assigned,
    Prop.LOWERED_ORT: _check_lowered_ort,
}


def check_property(prop: str, model: ir.Model) -> str | None:
    """A message saying how ``model`` violates ``prop``, or None when it holds."""
    return CHECKS[Prop(prop)](model)
