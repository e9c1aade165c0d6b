"""Graph analysis: linear layers, their producers, and groups of consumers sharing a producer.

A *linear* is ``MatMul(x, W)`` with a constant 2-D ``W`` of shape [in, out], optionally followed by
``Add(·, b)`` with a constant 1-D bias.  Its input ``x`` is *produced* by:

* a norm (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization) whose output feeds
  only linears — then all those linears form one group (q/k/v, gate/up) sharing one scale — also
  through Reshapes that keep the channel axis (``[b, s, C] → [b·s, C]`` before a Gemm);
* a previous linear through an operation that is linear per channel, so that a per-channel
  scale on x can be moved into that linear's output columns:
    - ``Mul(silu(gate), up)`` (SwiGLU): x's channel j is up's output channel j;
    - attention ``P·V`` (V→O): O's input channel of head h, dim d is V's output channel
      (h // group, d), with group = n_heads / n_kv_heads (GQA);
  every value on the path must have a single consumer, so scaling changes nothing else.

Anything else has no foldable producer; passes that need one skip it and count why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = ["GroupKind", "Via", "Linear", "Group", "find_linears", "find_groups", "NORM_OPS", "NORM_INPUTS", "SKIP_NORMS",
           "SHAPE_ONLY", "linear_name", "const_array", "value_users", "keeps_channels", "channel_readers"]

# norm op → (γ input index, β input index or None).  The Skip forms (ONNX Runtime contrib ops that
# onnxruntime-genai's builder emits) add a residual first: output 0 is the norm, output 3 the sum.
NORM_INPUTS = {"LayerNormalization": (1, 2), "RMSNormalization": (1, None), "SimplifiedLayerNormalization": (1, None),
               "SkipSimplifiedLayerNormalization": (2, None), "SkipLayerNormalization": (2, 3)}
NORM_OPS = set(NORM_INPUTS)
SKIP_NORMS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}
SHAPE_ONLY = {"Shape", "Size"}  # read a value's shape only: per-channel scales and rotations keep it
_PASSTHROUGH = {"Reshape", "Transpose"}  # rearrange channels into heads and back
_KV_REPEAT = {"Reshape", "Transpose", "Expand", "Unsqueeze"}


def value_users(v: ir.Value) -> list[ir.Node]:
    """The nodes that read ``v``'s values (not those reading only its shape: TorchScript exports' Shape)."""
    return [u.node for u in v.uses() if u.node.op_type not in SHAPE_ONLY]


class GroupKind(str, enum.Enum):
    """What a group's per-channel scale folds into (a str enum: ``GroupKind.NORM == "norm"``)."""

    NORM = "norm"
    LINEAR = "linear"
    NONE = "none"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Via(str, enum.Enum):
    """How a ``LINEAR`` group's activation comes from the previous linear (its value is the report text)."""

    GATED = "gated product"  # SwiGLU: down's input channel j is up's output channel j
    ATTENTION_VO = "attention V→O"  # O's input channels map to V's output channels (GQA)

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


@dataclass(eq=False)
class Linear:
    node: ir.Node  # the MatMul
    weight: ir.Value  # [in, out] initializer
    bias: ir.Value | None = None
    bias_node: ir.Node | None = None
    name: str = ""

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return (self.bias_node or self.node).outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.const_value.shape)


@dataclass(eq=False)
class Group:
    """Linears reading one activation, and the producer a per-channel scale folds into."""

    kind: GroupKind
    activation: ir.Value
    consumers: list[Linear]
    producer: ir.Node | None = None  # the norm node, or None
    producer_linear: Linear | None = None
    channel_map: np.ndarray | None = None  # consumer in-channel -> producer out-channel
    reason: str = ""  # for reports: why a NONE group has no producer, or the Via of a LINEAR one
    via: Via | None = None
    extra: dict = field(default_factory=dict)


def linear_name(node: ir.Node, weight: ir.Value, bias: ir.Value | None) -> str:
    """The layer's name: its weight's (``….weight``), else its bias's when no other node shares that bias
    (exporters merge identical constants: every zero bias of a model may be one initializer), else the node's."""
    if weight.name and weight.name.endswith(".weight"):
        return weight.name[: -len(".weight")]
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")  # torch's dynamo exporter: the module path
    if scopes:
        import ast

        try:
            path = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            path = []
        if len(path) >= 2 and path[-2]:
            return path[-2]
    if bias is not None and bias.name and bias.name.endswith(".bias") and len(list(bias.uses())) == 1:
        return bias.name[: -len(".bias")]
    if node.name and node.name.startswith("/") and node.name.count("/") > 1:  # TorchScript: /model/layers.0/q_proj/MatMul
        return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    return node.name or weight.name


def _is_initializer(graph: ir.Graph, value: ir.Value) -> bool:
    return value.const_value is not None and (value.is_initializer() or value.producer() is None)


def find_linears(graph: ir.Graph) -> list[Linear]:
    out = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        w = node.inputs[1]
        if w is None or not _is_initializer(graph, w) or len(w.const_value.shape) != 2:
            continue
        if w.name in graph.inputs:  # an initializer overridable as an input is not a constant
            continue
        bias = bias_node = None
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add" and node.outputs[0] not in graph.outputs:
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx]
            arr = const_array(other)
            if arr is not None and arr.ndim == 1 and arr.shape[0] == w.const_value.shape[1]:
                bias, bias_node = other, add
        out.append(Linear(node, w, bias, bias_node, linear_name(node, w, bias)))
    return out


def _single_use(v: ir.Value, graph: ir.Graph) -> bool:
    return len(value_users(v)) == 1 and v not in graph.outputs


def _cache_concat(node: ir.Node | None, v: ir.Value, graph: ir.Graph) -> bool:
    """``present = Concat(past_key_values.*, new)`` of a KV graph: the new part passes through (the cache
    holds whatever the graph stores, so a fold into the producer applies to past entries too)."""
    return (node is not None and node.op_type == "Concat" and len(node.inputs) == 2
            and node.inputs[0] in graph.inputs and (node.inputs[0].name or "").startswith("past_key_values.")
            and len(list(v.uses())) == 1)


def _trace_back(v: ir.Value, ops: set[str], graph: ir.Graph) -> tuple[ir.Value, list[ir.Node]]:
    path = []
    while True:
        node = v.producer()
        if _cache_concat(node, v, graph):
            path.append(node)
            v = node.inputs[1]
            continue
        if node is None or node.op_type not in ops or not _single_use(v, graph):
            return v, path
        path.append(node)
        v = node.inputs[0]


def _by_output(linears: list[Linear]) -> dict[ir.Value, Linear]:
    return {lin.output: lin for lin in linears}


def _head_dim(path: list[ir.Node]) -> int | None:
    for node in path:
        if node.op_type == "Reshape":
            shape = const_array(node.inputs[1])
            if shape is not None and shape.size == 4 and shape[-1] > 0:
                return int(shape[-1])
    return None


def _last_axis(node: ir.Node, src: ir.Value, default: int) -> bool:
    axis = next((a.as_int() for a in node.attributes.values() if a.name == "axis"), default)
    rank = len(src.shape) if src.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _slice_range(node: ir.Node, n: int) -> tuple[int, int] | None:
    """[start, end) of a constant step-1 Slice of the last axis (``n`` channels), else None."""
    parts = [const_array(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
             for i in range(1, 5)]
    starts, ends, axes, steps = parts
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if starts is None or ends is None or starts.size != 1 or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return None
    lo, hi = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
    return max(0, min(lo, n)), max(0, min(hi, n))


def _slice_of_linear(v: ir.Value, graph: ir.Graph, by_out: dict) -> tuple[Linear, np.ndarray] | None:
    """(linear, its output columns) when ``v`` is a last-axis Split/Slice of a fused linear's output (Phi-3's
    qkv_proj and gate_up_proj) whose other readers take disjoint columns: a scale on ``v``'s channels folds
    into those columns alone."""
    node = v.producer()
    if node is None or node.op_type not in ("Split", "Slice") or not _single_use(v, graph):
        return None
    src = node.inputs[0]
    lin = by_out.get(src)
    if lin is None or src in graph.outputs:
        return None
    n = lin.shape[1]
    if node.op_type == "Split":
        if value_users(src) != [node] or not _last_axis(node, src, 0):
            return None
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None:
            k = len(node.outputs)
            if n % k:
                return None
            sizes = np.full(k, n // k)
        i = list(node.outputs).index(v)
        start = int(np.sum(sizes[:i]))
        return lin, np.arange(start, start + int(sizes[i]))
    ranges = []
    for user in value_users(src):
        r = _slice_range(user, n) if user.op_type == "Slice" and user.inputs[0] is src else None
        if r is None:
            return None
        ranges.append((r, user is node))
    mine = next(r for r, me in ranges if me)
    if any(not me and r[0] < mine[1] and mine[0] < r[1] for r, me in ranges) or mine[0] >= mine[1]:
        return None
    return lin, np.arange(*mine)


def _linear_producer(x: ir.Value, graph: ir.Graph, by_out: dict) -> tuple[Linear | None, np.ndarray | None, str]:
    """A previous linear that a per-channel scale on x folds into, with the channel map."""
    node = x.producer()
    if node is None:
        return None, None, "graph input"
    if node.op_type == "Mul" and _single_use(x, graph):
        for side in (0, 1):
            lin = by_out.get(node.inputs[side])
            if lin is not None and _single_use(lin.output, graph) and lin.output is not node.inputs[1 - side]:
                n = lin.shape[1]
                return lin, np.arange(n), Via.GATED
        for side in (0, 1):  # a fused gate_up: the up half's columns
            fused = _slice_of_linear(node.inputs[side], graph, by_out)
            if fused is not None and node.inputs[0] is not node.inputs[1]:
                return fused[0], fused[1], Via.GATED
        return None, None, "Mul without a linear operand"
    # V→O: o_proj input <- Reshape/Transpose <- MatMul(P, V') <- Reshape/Transpose/Expand <- v_proj
    src, path = _trace_back(x, _PASSTHROUGH, graph)
    pv = src.producer()
    if pv is None or pv.op_type != "MatMul" or not path or not _single_use(src, graph):
        return None, None, f"produced by {node.op_type}"
    vsrc, vpath = _trace_back(pv.inputs[1], _KV_REPEAT, graph)
    lin, cols = by_out.get(vsrc), None
    if lin is None:  # V sliced from a fused qkv
        fused = _slice_of_linear(vsrc, graph, by_out)
        lin, cols = fused if fused is not None else (None, None)
    elif not _single_use(lin.output, graph):
        lin = None
    if lin is None:
        return None, None, "attention output whose V is not a single-use linear"
    n_v = lin.shape[1] if cols is None else len(cols)
    hd = _head_dim(vpath) or _head_dim(path)
    return lin, ("vo", n_v, hd, cols), Via.ATTENTION_VO


def keeps_channels(node: ir.Node, n: int) -> bool:
    """``node`` is a Reshape/Flatten that leaves the last axis (``n`` channels) whole: rows map to rows."""
    if node.op_type not in ("Reshape", "Flatten") or not node.inputs or not node.outputs:
        return False
    src, out = node.inputs[0], node.outputs[0]
    target = const_array(node.inputs[1]) if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    src_n = src.shape[-1] if src.shape is not None and len(src.shape) else None
    out_n = out.shape[-1] if out.shape is not None and len(out.shape) else None
    if target is not None and target.size and int(target[-1]) == n:
        out_n = n
    return src_n == n and out_n == n


def channel_readers(v: ir.Value, by_input: dict, n: int) -> list | None:
    """The linears reading ``v`` directly or through channel-keeping reshapes; None if anything else reads it."""
    found, todo = [], [v]
    while todo:
        x = todo.pop()
        lins = by_input.get(x, [])
        for user in value_users(x):
            if any(lin.node is user for lin in lins):
                continue
            if keeps_channels(user, n) and user.inputs[0] is x:
                todo.append(user.outputs[0])
                continue
            return None
        found.extend(lins)
    return found


def _through_flatten(act: ir.Value, n_in: int, graph: ir.Graph) -> ir.Value:
    """The value before Reshapes that keep the channel axis (``[b, s, C] → [b·s, C]``, GPT-2's Conv1D).

    A per-channel scale commutes with a reshape that leaves the last axis whole, so a norm before
    the reshape is still the activation's foldable producer.
    """
    v = act
    while True:
        node = v.producer()
        if node is None or node.op_type not in ("Reshape", "Flatten") or not node.inputs:
            return v
        src = node.inputs[0]
        target = const_array(node.inputs[1]) if node.op_type == "Reshape" and len(node.inputs) > 1 else None
        keeps = (target is not None and target.size and int(target[-1]) == n_in) or (
            v.shape is not None and src.shape is not None and len(v.shape) and len(src.shape)
            and v.shape[-1] == n_in and src.shape[-1] == n_in)
        if not keeps or not _single_use(src, graph):
            return v
        v = src


def _constant_scales(norm: ir.Node) -> bool:
    """The norm's γ (and β) are constants a scale can fold into."""
    return all(i is None or i >= len(norm.inputs) or norm.inputs[i] is None or norm.inputs[i].const_value is not None
               for i in NORM_INPUTS[norm.op_type])


def find_groups(graph: ir.Graph, linears: list[Linear] | None = None) -> list[Group]:
    """Group linears by the activation they read; classify each group's producer."""
    linears = find_linears(graph) if linears is None else linears
    by_input: dict[ir.Value, list[Linear]] = {}
    for lin in linears:
        by_input.setdefault(lin.input, []).append(lin)
    by_out = _by_output(linears)
    groups = []
    for act, consumers in by_input.items():
        n_in = consumers[0].shape[0]
        node = act.producer()
        src = _through_flatten(act, n_in, graph) if len(consumers) == len(value_users(act)) else act
        if src is not act and src.producer() is not None and src.producer().op_type in NORM_OPS \
                and src is src.producer().outputs[0] and _constant_scales(src.producer()):
            groups.append(Group(GroupKind.NORM, act, consumers, producer=src.producer(), reason="norm through a reshape"))
            continue
        if node is not None and node.op_type in NORM_OPS and act is node.outputs[0]:
            users = value_users(act)
            if act in graph.outputs or any(u not in {c.node for c in consumers} for u in users):
                others = sorted({u.op_type for u in users if u not in {c.node for c in consumers}})
                groups.append(Group(GroupKind.NONE, act, consumers, reason=f"{node.op_type} output also feeds "
                                    f"{', '.join(others) or 'a graph output'} (post-norm residual or sandwich norm)"))
            elif not _constant_scales(node):
                groups.append(Group(GroupKind.NONE, act, consumers,
                                    reason=f"{node.op_type} scale is not a constant initializer"))
            else:
                groups.append(Group(GroupKind.NORM, act, consumers, producer=node))
            continue
        if len(consumers) != len(value_users(act)):
            groups.append(Group(GroupKind.NONE, act, consumers, reason="activation also feeds non-linears"))
            continue
        lin, cmap, reason = _linear_producer(act, graph, by_out)
        if lin is None and src is not act and src.producer() is not None:
            reason = f"produced by {src.producer().op_type} (through a reshape)"
        if lin is None:
            groups.append(Group(GroupKind.NONE, act, consumers, reason=reason))
            continue
        if isinstance(cmap, tuple):  # V→O: build the GQA channel map
            _, n_v, hd, cols = cmap
            if n_in == n_v:
                cmap = np.arange(n_in)
            elif hd and n_in % n_v == 0 and n_v % hd == 0:
                group = n_in // n_v
                c = np.arange(n_in)
                cmap = (c // hd // group) * hd + c % hd
            else:
                groups.append(Group(GroupKind.NONE, act, consumers, reason="cannot map O channels to V channels"))
                continue
            if cols is not None:  # V's columns inside a fused qkv
                cmap = cols[cmap]
        if len(cmap) != n_in:
            groups.append(Group(GroupKind.NONE, act, consumers, reason="channel count mismatch"))
            continue
        groups.append(Group(GroupKind.LINEAR, act, consumers, producer=lin.node, producer_linear=lin,
                            channel_map=cmap, reason=str(reason.value), via=reason))
    return groups
