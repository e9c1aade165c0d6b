"""Float precision of a model: compute in float32 inside, keep the user's float type at the interface.

lowbit's passes (calibration statistics, smoothing, rotation, GPTQ, QDQ with float32 scales) all
compute in float32.  A float16 / bfloat16 / float64 model is brought to a float32 *interior*:
every float initializer, ``Constant``/``ConstantOfShape`` value and ``Cast``/dtype attribute of
another float type becomes float32, and each graph input / output of that type is converted once
at the boundary (``Cast`` after the input, ``Cast`` before the output).  Its interface (names,
types, shapes) is unchanged, and every node inside is type-consistent, so every node a later pass
inserts (float32 scales, float32 dequantized weights) matches its neighbours.

The float32 interior computes the same function as the original with less rounding (float16 and
bfloat16 values are exactly representable in float32); float64 models lose precision to float32,
which quantization dwarfs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["OTHER_FLOATS", "model_float_type", "to_float32_interior"]

logger = logging.getLogger(__name__)

OTHER_FLOATS = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_DTYPE_ATTRS = ("to", "dtype", "output_dtype", "stash_type")


def model_float_type(model: ir.Model) -> ir.DataType | None:
    """The float type of the model's interface (first float input or output), or None."""
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.dtype is not None and (v.dtype in OTHER_FLOATS or v.dtype == ir.DataType.FLOAT):
            return v.dtype
    return None


def _f32_tensor(t: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(t.numpy(), dtype=np.float32), name=name)


def _convert_graph(graph: ir.Graph | ir.Function) -> int:
    changed = 0
    if isinstance(graph, ir.Graph):
        for v in graph.initializers.values():
            t = v.const_value
            if t is not None and t.dtype in OTHER_FLOATS:
                v.const_value = _f32_tensor(t, v.name)
                if isinstance(t, ir.ExternalTensor):
                    t.release()
                v.dtype = ir.DataType.FLOAT
                changed += 1
    for node in graph:
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None and attr.value.dtype in OTHER_FLOATS:
                node.attributes[attr.name] = ir.AttrTensor(attr.name, _f32_tensor(attr.value, attr.value.name))
                changed += 1
            elif attr.name in _DTYPE_ATTRS and attr.type == ir.AttributeType.INT \
                    and ir.DataType(attr.value) in OTHER_FLOATS:
                node.attributes[attr.name] = ir.AttrInt64(attr.name, int(ir.DataType.FLOAT))
                changed += 1
            elif attr.type == ir.AttributeType.GRAPH:
                changed += _convert_graph(attr.value)
        for out in node.outputs:
            if out.dtype in OTHER_FLOATS:
                out.dtype = ir.DataType.FLOAT
    return changed


def to_float32_interior(model: ir.Model) -> bool:
    """Rewrite a float16/bfloat16/float64 model in place to a float32 interior; True if anything changed."""
    graph = model.graph
    boundary = [v for v in [*graph.inputs, *graph.outputs] if v.dtype in OTHER_FLOATS]
    out_types = {i: v.dtype for i, v in enumerate(graph.outputs) if v.dtype in OTHER_FLOATS}
    changed = _convert_graph(graph)
    for f in model.functions.values():
        changed += _convert_graph(f)
    if not boundary and not changed:
        return False
    first = next(iter(graph), None)
    for v in [x for x in graph.inputs if x.dtype in OTHER_FLOATS]:
        users = [(u.node, u.idx) for u in v.uses()]
        cast = ir.node("Cast", [v], attributes={"to": ir.DataType.FLOAT}, name=f"{v.name}.to_float32")
        cast.outputs[0].name = f"{v.name}_float32"
        cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, v.shape
        cast.metadata_props["lowbit.origin"] = "float32-interior"
        if first is not None:
            graph.insert_before(first, cast)
        else:
            graph.append(cast)
        for node, idx in users:
            node.replace_input_with(idx, cast.outputs[0])
    for i, want in out_types.items():
        v = graph.outputs[i]
        if v.producer() is None or v.producer().op_type == "Cast" and v.producer().name.endswith(".to_float32"):
            continue  # an input passed straight through keeps its type
        name = v.name
        v.name = f"{name}_float32"
        v.dtype = ir.DataType.FLOAT
        cast = ir.node("Cast", [v], attributes={"to": want}, name=f"{name}.to_interface")
        cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, want, v.shape
        cast.metadata_props["lowbit.origin"] = "float32-interior"
        graph.append(cast)
        graph.outputs[i] = cast.outputs[0]
    model.metadata_props["lowbit.interface_float"] = str(boundary[0].dtype.name) if boundary else "FLOAT"
    logger.info("float32 interior: %d tensors/attributes converted, %d interface values kept", changed, len(boundary))
    return True
