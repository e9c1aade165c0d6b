"""Rotation folding (QuaRot) for pre-norm decoders.  For orthogonal Q: (x·Q)(Qᵀ·W) = x·W.

* R1 (residual stream, d×d): the embedding table becomes E·Q, so the stream carries x·Q.  RMSNorm
  commutes with Q when its scale is 1 (‖xQ‖ = ‖x‖), which ``fold-norms`` guarantees.  LayerNorm
  (γ = 1, β = 0) is x·C/‖x·C‖·√d with the centring C = I − 11ᵀ/d; it commutes with every orthogonal Q
  that fixes the ones vector (Q·1 = 1 ⇒ Qᵀ·1 = 1 ⇒ C·Q = Q·C), so on a stream that any LayerNorm reads,
  Q is made to fix 1 by a Householder reflection P (P·(Q₀·u) = u, u = 1/√d): Q = P·Q₀ still spreads
  every centred direction like Q₀ (SliceGPT's observation that LayerNorm models rotate once the mean
  is taken out, without rewriting the norms).  Parallel residuals (x + attn(n(x)) + mlp(n(x))) are
  sums of writers.  So every
  linear reading a norm of the stream takes Qᵀ·W (q/k/v, gate/up, the head) and every linear
  writing into it (o, down) takes W·Q (and b·Q).  A tied head is its own initializer in lowbit's
  graphs, so it is rotated as a reader; the embedding is rotated separately.
* R2 (per head, hd×hd): V's output columns of every KV head take ·R2 and O's input rows of every
  head take R2ᵀ· (attention mixes tokens, not channels within a head; GQA shares R2).
* Online Hadamard: ``lowbit.Hadamard`` with H = H_p/√p ⊗ Q_m (p = largest power of two dividing
  the FFN width, Q_m a seeded orthogonal m×m) is inserted before each down-projection, whose rows
  take Hᵀ·W, so the down-projection's input is spread out before it is quantized.

Q is a randomised Hadamard (``kind=hadamard``: random signs · H_p ⊗ Q_m) or a random orthogonal
matrix (``kind=random``).  Float outputs are unchanged up to rounding.  Models where this does not
apply (post-norm encoders, LayerNorm over other than the last axis, a stream read by anything but
norms and residual adds) are refused, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import (NORM_INPUTS, GroupKind, Linear, Via, channel_readers, const_array, find_groups,
                                find_linears, keeps_channels, value_users)
from lowbit.passmanager.manager import CALIBRATED, HESSIAN
from lowbit.ops.registry import DOMAIN, attach_functions
from lowbit.ops.float_ops import hadamard_matrix
from lowbit.passmanager.manager import Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, set_input_const
from lowbit.ir.subgraphs import subgraph_owners, subgraph_readers

__all__ = ["Rotate", "orthogonal", "kron_factors", "fix_ones"]

_RMS = {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
_LN = {"LayerNormalization", "SkipLayerNormalization"}


def kron_factors(n: int) -> tuple[int, int]:
    """n = p·m with p the largest power of two dividing n."""
    p = n & -n
    return p, n // p


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def orthogonal(n: int, kind: str, rng: np.random.Generator, signs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(full n×n orthogonal matrix, its small Kronecker factor Q_m) for ``kind`` hadamard|random."""
    if kind == "random":
        return _random_orthogonal(n, rng), None
    p, m = kron_factors(n)
    qm = _random_orthogonal(m, rng) if m > 1 else np.ones((1, 1))
    full = np.kron(hadamard_matrix(p), qm)
    if signs:
        full = rng.choice([-1.0, 1.0], n)[:, None] * full
    return full, qm


def fix_ones(q: np.ndarray) -> np.ndarray:
    """P·q for the Householder reflection P taking q·u to u (u = 1/√n): an orthogonal matrix with ·1 = 1."""
    n = q.shape[0]
    u = np.full(n, n ** -0.5)
    w = q @ u - u
    norm = np.linalg.norm(w)
    if norm < 1e-12:
        return q
    w /= norm
    return q - 2.0 * np.outer(w, w @ q)


_INDEX_PATH = {"Reshape", "Unsqueeze", "Squeeze", "Cast", "Flatten", "Identity"}
_NO_CHANNEL_USE = {"Shape", "Size"}  # read only the stream's shape, which a rotation keeps
_ALTERNATIVE = "use a recipe without rotation instead (w4a16-gptq, w8a8, w8a8-dynamic)"


def _through_reshapes(v: ir.Value, d: int) -> ir.Value:
    """The value before single-use reshapes that keep the ``d`` channels (a 2-D linear's output viewed as 3-D)."""
    while v.producer() is not None and keeps_channels(v.producer(), d) and len(v.producer().inputs[0].uses()) == 1:
        v = v.producer().inputs[0]
    return v


def _from_input(v: ir.Value, graph: ir.Graph) -> bool:
    """``v`` is a graph input, possibly reshaped or cast (token ids flattened before the embedding)."""
    while v is not None and v not in graph.inputs:
        node = v.producer()
        if node is None or node.op_type not in _INDEX_PATH:
            return False
        v = node.inputs[0]
    return v is not None


@register_pass("rotate")
class Rotate(Pass):
    @dataclass(frozen=True)
    class Options:
        seed: int = 0
        kind: Literal["hadamard", "random"] = "hadamard"
        r2: bool = True
        online: bool = True  # online Hadamard before down-projections

        def __post_init__(self):
            if self.kind not in ("hadamard", "random"):
                raise ValueError(f"rotate: kind must be hadamard or random, got {self.kind}")
            if not 0 <= self.seed < 2 ** 32:
                raise ValueError(f"rotate: seed must be in [0, 2^32), got {self.seed}")

    float_equivalent = True
    invalidates_properties = (CALIBRATED, HESSIAN)

    def call(self, model):
        graph = model.graph
        rng = np.random.default_rng(self.options.seed)
        linears = find_linears(graph)
        by_input: dict[ir.Value, list[Linear]] = {}
        for lin in linears:
            by_input.setdefault(lin.input, []).append(lin)
        by_output = {lin.output: lin for lin in linears}
        embed = self._embedding(graph)
        self._tables, self._consts, self._layernorms = [embed], [], 0
        self._owners = subgraph_owners(graph)  # nodes of If/Loop/Scan bodies → their owner
        readers, writers = self._walk(graph, embed.outputs[0], by_input, by_output)
        d = const_array(embed.inputs[0]).shape[1]
        q, _ = orthogonal(d, self.options.kind, rng)
        if self._layernorms:
            q = fix_ones(q)
            self.stats["layernorm"] = self._layernorms
        for table in self._tables:
            set_input_const(graph, table, 0, const_array(table.inputs[0]).astype(np.float64) @ q)
        for node, idx in self._consts:  # constants added to the stream (positions folded by a fixed-shape export)
            set_input_const(graph, node, idx, const_array(node.inputs[idx]).astype(np.float64) @ q)
        for lin in readers:
            self._weight(graph, lin, q.T @ self._w(lin))
        for lin in writers:
            self._weight(graph, lin, self._w(lin) @ q)
            if lin.bias is not None:
                idx = list(lin.bias_node.inputs).index(lin.bias)
                set_input_const(graph, lin.bias_node, idx, const_array(lin.bias).astype(np.float64) @ q)
        self.stats["r1_readers"], self.stats["r1_writers"] = len(readers), len(writers)
        groups = find_groups(graph)
        if self.options.r2:
            for g in groups:
                if g.kind is GroupKind.LINEAR and g.via is Via.ATTENTION_VO:
                    self._r2(graph, g, rng)
        if self.options.online:
            for g in groups:
                if g.kind is GroupKind.LINEAR and g.via is Via.GATED:
                    for lin in g.consumers:
                        self._online(graph, lin, rng)
        graph.meta.pop("lowbit.names", None)
        graph.meta.pop("lowbit.hadamard", None)
        attach_functions(model)
        self.ctx.report["rotate"] = {"kind": self.options.kind, "seed": self.options.seed, **dict(self.stats)}
        return PassResult(model, modified=True)

    @staticmethod
    def _w(lin: Linear) -> np.ndarray:
        return lin.weight.const_value.numpy().astype(np.float64)

    def _weight(self, graph, lin: Linear, w: np.ndarray) -> None:
        set_input_const(graph, lin.node, 1, w)

    def _embedding(self, graph: ir.Graph) -> ir.Node:
        for node in graph:
            if node.op_type == "Gather" and const_array(node.inputs[0]) is not None \
                    and const_array(node.inputs[0]).ndim == 2 and _from_input(node.inputs[1], graph):
                return node
        self.fail("no token embedding (Gather of a 2-D initializer by a graph input) starts a residual stream",
                  hint=f"rotate applies to decoder LMs; {_ALTERNATIVE}")

    def _walk(self, graph, start: ir.Value, by_input, by_output) -> tuple[list[Linear], list[Linear]]:
        readers, writers, todo, seen = [], [], [start], set()
        d_stream = const_array(start.producer().inputs[0]).shape[1]
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if s in graph.outputs:
                self.fail(f"the residual stream value '{s.name}' is a graph output; rotating would change it")
            owner = self._subgraph_reader(s)
            if owner is not None:
                self.fail(f"the residual stream value '{s.name}' is read inside the subgraph of {owner.op_type} "
                          f"'{owner.name}'; rotate rewrites the main graph only", node=owner, hint=_ALTERNATIVE)
            for use in list(s.uses()):
                node = use.node
                if node.op_type in _NO_CHANNEL_USE:
                    continue
                if node.op_type in ("Mul", "Div") and use.idx == 0 or node.op_type == "Mul":
                    k = const_array(node.inputs[1 - use.idx])
                    if k is not None and k.size == 1:  # a scalar scale (Gemma's √d) commutes with Q
                        todo.append(node.outputs[0])
                        continue
                if keeps_channels(node, d_stream) and use.idx == 0:  # [b, s, d] → [b·s, d] (OPT) and back
                    todo.append(node.outputs[0])
                    continue
                if node.op_type in _RMS | _LN:
                    if node.op_type.startswith("Skip"):  # out = norm(input + skip + bias)
                        self._skip_norm(node, use.idx, s, seen, by_output, writers, todo)
                    out = node.outputs[0]
                    lins = channel_readers(out, by_input, d_stream)
                    owner = self._subgraph_reader(out)
                    if owner is not None:
                        self.fail(f"the output of {node.op_type} is read inside the subgraph of {owner.op_type} "
                                  f"'{owner.name}'; rotate rewrites the main graph only, so that subgraph would "
                                  "compute with unrotated values", node=node, hint=_ALTERNATIVE)
                    if not lins or out in graph.outputs:
                        others = sorted({u.op_type for u in value_users(out)} - {"MatMul", "Reshape", "Flatten"})
                        what = ", ".join(others) + (", " if others and out in graph.outputs else "") \
                            + ("a graph output" if out in graph.outputs else "")
                        what = what or "a non-linear"
                        self.fail(f"the output of {node.op_type} feeds something other than linears ({what}: a "
                                  "post-norm residual, an embedding norm or a sandwich norm), so it cannot take the "
                                  "rotation's inverse", node=node, hint=_ALTERNATIVE)
                    if node.op_type in _LN:
                        self._check_layernorm(node)
                    gi = NORM_INPUTS[node.op_type][0]
                    gamma = const_array(node.inputs[gi]) if len(node.inputs) > gi else None
                    if gamma is None or not np.all(gamma == 1):
                        self.fail("norm scale γ is not 1: a norm commutes with a rotation only at unit scale",
                                  node=node, hint="run fold-norms before rotate")
                    readers.extend(lins)
                elif node.op_type == "Add":
                    other = node.inputs[1 - use.idx]
                    lin = by_output.get(_through_reshapes(other, d_stream))
                    table = other.producer()
                    if lin is None and table is not None and table.op_type == "Gather" \
                            and const_array(table.inputs[0]) is not None and const_array(table.inputs[0]).ndim == 2:
                        self._tables.append(table)  # learned positions added to the embedding: rotated alike
                        todo.append(node.outputs[0])
                        continue
                    arr = const_array(other)
                    if lin is None and arr is not None and arr.ndim >= 1 and arr.shape[-1] == d_stream:
                        self._consts.append((node, 1 - use.idx))
                        todo.append(node.outputs[0])
                        continue
                    summed = self._summed_writers(other, by_output, d_stream) if lin is None and other not in seen else None
                    if summed is not None:  # a parallel residual: x + (attn(n(x)) + mlp(n(x)))
                        writers.extend(summed)
                        todo.append(node.outputs[0])
                        continue
                    if lin is None and other not in seen:
                        prod = other.producer()
                        what = f"the output of {prod.op_type} '{prod.name}'" if prod is not None else f"'{other.name}'"
                        if prod is not None and prod.op_type in _RMS | {"LayerNormalization"}:
                            what += " (a sandwich norm after the layer)"
                        self.fail(f"a residual Add adds {what}, not a linear layer's output", node=node,
                                  hint=_ALTERNATIVE)
                    if lin is not None:
                        writers.append(lin)
                    todo.append(node.outputs[0])
                else:
                    self.fail(f"the residual stream feeds {node.op_type}; rotation folds only into norms and "
                              "residual adds (is this a post-norm model?)", node=node, hint=_ALTERNATIVE)
        if readers and not writers:  # ELECTRA: embedding → LayerNorm → embeddings_project, a post-norm stack after
            names = ", ".join(sorted({r.name for r in readers}))
            self.fail(f"the embedding's stream is read by {names} but no linear writes back into it: it feeds a "
                      "projection or a post-norm stack, not a pre-norm residual stream", node=readers[0].node,
                      hint=_ALTERNATIVE)
        if not readers or not writers:
            self.fail("no linear reads or writes the residual stream")
        return readers, writers

    def _subgraph_reader(self, v: ir.Value, depth: int = 0) -> ir.Node | None:
        """The If/Loop/Scan whose body reads ``v`` (or a reshape of it), else None."""
        found = subgraph_readers(v, self._owners)
        if found:
            return found[0]
        for user in value_users(v):
            if user.op_type in ("Reshape", "Flatten") and depth < 3:
                owner = self._subgraph_reader(user.outputs[0], depth + 1)
                if owner is not None:
                    return owner
        return None

    def _skip_norm(self, node, idx, s, seen, by_output, writers, todo) -> None:
        """SkipSimplifiedLayerNormalization(input, skip, γ, bias): the residual add and the norm in one op;
        the other summand is a writer, the bias a constant on the stream, output 3 the stream after the add."""
        if idx > 1:
            self.fail("the residual stream is a norm's scale or bias", node=node, hint=_ALTERNATIVE)
        other = node.inputs[1 - idx]
        lin = by_output.get(other)
        if lin is not None:
            writers.append(lin)
        elif other not in seen and other is not s:
            prod = other.producer()
            self.fail(f"a fused residual add sums {prod.op_type if prod else 'an input'} output, not a linear "
                      "layer's output", node=node, hint=_ALTERNATIVE)
        bias = 4 if node.op_type == "SkipLayerNormalization" else 3  # (input, skip, γ[, β], bias)
        if len(node.inputs) > bias and node.inputs[bias] is not None:
            if const_array(node.inputs[bias]) is None:
                self.fail("the fused residual add has a non-constant bias", node=node, hint=_ALTERNATIVE)
            self._consts.append((node, bias))
        if len(node.outputs) > 3 and node.outputs[3] is not None and list(node.outputs[3].uses()):
            todo.append(node.outputs[3])

    def _check_layernorm(self, node: ir.Node) -> None:
        """LayerNorm commutes with a ones-fixing rotation when it normalises the last axis with β = 0."""
        axis = next((a.as_int() for a in node.attributes.values() if a.name == "axis"), -1)
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            self.fail(f"LayerNormalization over axis {axis} (not the last, channel axis) does not commute with a "
                      "rotation of the channels", node=node, hint=_ALTERNATIVE)
        bi = NORM_INPUTS[node.op_type][1]
        beta = node.inputs[bi] if len(node.inputs) > bi else None
        if beta is not None and (const_array(beta) is None or np.any(const_array(beta) != 0)):
            self.fail("LayerNorm shift β is not 0: it would be rotated away", node=node,
                      hint="run fold-norms before rotate")
        self._layernorms += 1

    @staticmethod
    def _summed_writers(v: ir.Value, by_output, d: int) -> list[Linear] | None:
        """The linears whose outputs (and constant rows) ``v`` sums through Adds read only there, else None."""
        out, todo = [], [v]
        while todo:
            x = todo.pop()
            prod = x.producer()
            if _through_reshapes(x, d) in by_output:
                out.append(by_output[_through_reshapes(x, d)])
            elif prod is not None and prod.op_type == "Add" and (x is v or len(value_users(x)) == 1):
                todo.extend(prod.inputs)
            else:
                return None
        return out if len(out) > 1 else None

    def _r2(self, graph, group, rng) -> None:
        v, o = group.producer_linear, group.consumers[0]
        if np.unique(group.channel_map).size != v.shape[1]:  # V is a slice of a fused qkv: R2 would turn Q, K too
            self.stats["r2_skipped"] += 1
            return
        hd = None
        for use in v.output.uses():
            if use.node.op_type == "Reshape":
                shape = const_array(use.node.inputs[1])
                hd = int(shape[-1]) if shape is not None and shape[-1] > 0 else None
        if hd is None or v.shape[1] % hd or o.shape[0] % hd:
            self.stats["r2_skipped"] += 1
            return
        r2, _ = orthogonal(hd, self.options.kind, rng)
        wv = self._w(v).reshape(v.shape[0], -1, hd) @ r2
        self._weight(graph, v, wv.reshape(v.shape))
        if v.bias is not None:
            idx = list(v.bias_node.inputs).index(v.bias)
            b = const_array(v.bias).astype(np.float64).reshape(-1, hd) @ r2
            set_input_const(graph, v.bias_node, idx, b.reshape(-1))
        wo = np.einsum("ij,hjn->hin", r2.T, self._w(o).reshape(-1, hd, o.shape[1]))
        self._weight(graph, o, wo.reshape(o.shape))
        self.stats["r2"] += 1

    def _online(self, graph, lin: Linear, rng) -> None:
        n = lin.shape[0]
        cache = graph.meta.setdefault("lowbit.hadamard", {})  # one Q_m per width, shared by all layers
        if n not in cache:
            h, qm = orthogonal(n, "hadamard", rng, signs=False)
            cache[n] = (h, add_initializer(graph, f"hadamard_q{n}", qm.astype(np.float32)))
        h, qv = cache[n]
        node = make_node(graph, "Hadamard", [lin.input, qv], origin=self.name, name=f"{lin.name}.hadamard",
                         domain=DOMAIN, before=lin.node)
        node.metadata_props["lowbit.width"] = str(n)
        lin.node.replace_input_with(0, node.outputs[0])
        self._weight(graph, lin, h.T @ self._w(lin))
        self.stats["online_hadamard"] += 1
