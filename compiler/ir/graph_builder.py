"""A small builder for ONNX graphs written by lowbit's own frontends.

It emits standard-op ``onnx`` protos with unique node and value names and converts the result to
an ``ir.Model``.  Passes never use it: they edit the IR through ``onnx_ir``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

__all__ = ["GraphBuilder"]


class GraphBuilder:
    def __init__(self, opset: int = 23):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def init(self, name: str, array: np.ndarray) -> str:
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init("const", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs, name: str | None = None, outputs: int = 1, out: str | None = None,
           domain: str = "", **attrs):
        node_name = self.fresh(name or op_type)
        outs = [out or node_name] if outputs == 1 else [f"{node_name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def build(self, graph_name: str, metadata: dict[str, str] | None = None, producer: str = "lowbit") -> ir.Model:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs)
        domains = sorted({n.domain for n in self.nodes if n.domain not in ("", "ai.onnx")})
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]
                                  + [helper.make_opsetid(d, 1) for d in domains], producer_name=producer)
        inits, self.inits = self.inits[::-1], []
        while inits:  # the initializers go in after make_model (which copies the graph), each original freed
            proto.graph.initializer.append(inits.pop())  # once copied: peak memory one model, not three
        proto.ir_version = 10
        for k, v in (metadata or {}).items():
            proto.metadata_props.add(key=k, value=v)
        return ir.serde.deserialize_model(proto)
