"""Rotation folding (QuaRot) for pre-norm decoders.  For orthogonal Q: (x·Q)(Qᵀ·W) = x·W.

* R1 (residual stream, d×d): the embedding table becomes E·Q, so the stream carries x·Q.  RMSNorm
  commutes with Q when its scale is 1 (‖xQ‖ = ‖x‖), which ``fold-norms`` guarantees, so every
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
apply (LayerNorm with mean subtraction, post-norm encoders, a stream read by anything but norms
and residual adds) are refused, naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import GroupKind, Linear, Via, const_array, find_groups, find_linears
from lowbit.passmanager.manager import CALIBRATED, HESSIAN
from lowbit.ops.registry import DOMAIN, attach_functions
from lowbit.ops.float_ops import hadamard_matrix
from lowbit.passmanager.manager import Pass, PassResult, register_pass
from lowbit.ir.rewrite import add_initializer, make_node, set_input_const

__all__ = ["Rotate", "orthogonal", "kron_factors"]

_RMS = {"RMSNormalization", "SimplifiedLayerNormalization"}


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
        readers, writers = self._walk(graph, embed.outputs[0], by_input, by_output)
        d = const_array(embed.inputs[0]).shape[1]
        q, _ = orthogonal(d, self.options.kind, rng)
        set_input_const(graph, embed, 0, const_array(embed.inputs[0]).astype(np.float64) @ q)
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
                    and const_array(node.inputs[0]).ndim == 2 and node.inputs[1] in graph.inputs:
                return node
        self.fail("no token embedding (Gather of a 2-D initializer by a graph input) starts a residual stream",
                  hint="rotate applies to decoder LMs built by lowbit's frontends (llama2.c, HF Llama)")

    def _walk(self, graph, start: ir.Value, by_input, by_output) -> tuple[list[Linear], list[Linear]]:
        readers, writers, todo, seen = [], [], [start], set()
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if s in graph.outputs:
                self.fail(f"the residual stream value '{s.name}' is a graph output; rotating would change it")
            for use in list(s.uses()):
                node = use.node
                if node.op_type == "LayerNormalization":
                    self.fail("the residual stream is normalised by LayerNormalization (mean subtraction), "
                              "which does not commute with a rotation; post-norm encoders (BERT) and LayerNorm "
                              "models are not supported", node=node,
                              hint="use rotate on pre-norm RMSNorm decoders (Llama family)")
                if node.op_type in _RMS:
                    gamma = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
                    if gamma is None or not np.all(gamma == 1):
                        self.fail("norm scale γ is not 1: RMSNorm commutes with a rotation only at unit scale",
                                  node=node, hint="run fold-norms before rotate")
                    out = node.outputs[0]
                    lins = by_input.get(out, [])
                    if not lins or {u.node for u in out.uses()} != {lin.node for lin in lins}:
                        self.fail("a normalised stream feeds something other than linears", node=node,
                                  hint="post-norm models, or norms read by non-linear ops, cannot be rotated")
                    readers.extend(lins)
                elif node.op_type == "Add":
                    other = node.inputs[1 - use.idx]
                    lin = by_output.get(other)
                    if lin is None and other not in seen:
                        self.fail("a residual Add whose other operand is not a linear layer's output", node=node)
                    if lin is not None:
                        writers.append(lin)
                    todo.append(node.outputs[0])
                else:
                    self.fail(f"the residual stream feeds {node.op_type}; rotation folds only into norms and "
                              "residual adds (is this a post-norm model?)", node=node)
        if not readers or not writers:
            self.fail("no linear reads or writes the residual stream")
        return readers, writers

    def _r2(self, graph, group, rng) -> None:
        v, o = group.producer_linear, group.consumers[0]
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
