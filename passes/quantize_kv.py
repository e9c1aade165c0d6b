"""KV-cache quantization: the graph's past/present tensors hold 8- or 4-bit codes, not floats.

For each layer of a KV-cache graph (``present.{i}.key = Concat(past_key_values.{i}.key, k_new)``,
likewise for values) the new keys/values are quantized once, when they enter the cache; the
cache itself (graph input and output) holds uint8 codes — int4 packed two per byte, low nibble =
even channel — and attention reads ``dequant(cache)``:

* **K, ``k_mode=channel``** (KIVI's observation that key outliers live in fixed channels): static
  per-(head, channel) scales from calibration, ``q = clip(round((k−c)/s) + 2^(b−1), 0, 2^b−1)``,
  ``k̂ = (q − 2^(b−1))·s + c`` with ``s = r / (2^(b−1)−1)``, no per-token storage.  The cache holds keys
  *after* RoPE, whose range in a rotated channel depends on the position: calibrated min/max of
  the positions seen clip later positions.  So for rotated channels (pairing read from the
  frontend's ``lowbit.config``: ``rope_style``, ``rotary_dim``) the range is position-free:
  ``c = 0``, ``r = max ‖(k_a, k_b)‖`` over the channel's RoPE pair (a rotation keeps the pair's norm);
  unrotated channels (and graphs without that metadata) use ``c = (max+min)/2``, ``r = (max−min)/2``.
* **K, ``k_mode=token``** and **V always**: dynamic asymmetric per (token, head, group of ``group``
  channels; 0, or a group ≥ the head dim = the whole head): ``s = (max−min)/(2^b−1)``, ``q = clip(round((x−min)/s), 0, 2^b−1)``,
  ``x̂ = q·s + min``, with s and min stored as float16 in a cache tensor of their own,
  ``past_key_values.{i}.value_scale`` [b, kv, t, 2·groups] → ``present.{i}.value_scale`` (s and min
  are rounded to float16 before quantizing, so codes and stored parameters agree exactly).
  Per-token V keeps each token's error independent of the others.
* **``hadamard=true``** (QuaRot): keys are rotated by the normalised Hadamard H (symmetric,
  H·H = I) after RoPE and before quantization, and the queries by the same H:
  ``(qH)(kH)ᵀ = qkᵀ``; values are rotated before quantization and the attention output by H
  again: ``P·(VH)·H = P·V``.  The rotation spreads channel outliers over the head, which helps
  per-token groups; with ``k_mode=channel`` the RoPE pairs are mixed, so K's ranges are min/max.
  Uses the ``lowbit.Hadamard`` op; needs a power-of-two head dim.

``sink=N`` keeps the first N positions of K and V also in float (a cache tensor ``…key_sink`` of at
most N positions, ``past_key_values.{i}.key_sink`` → ``present.{i}.key_sink``) and attention reads
them from there: the attention-sink tokens that most heads attend to are not quantized (IntactKV,
PrefixQuant); N·(float bytes per token) once, not per token.

``k_mode=token`` is the default and the recipes' 4-bit caches use ``group=16,hadamard=true``: chosen on
TinyStories stories 100–399 (``benchmarks/kv_quality.py``, stories260K and SmolLM2-135M; numbers in
``benchmarks/KV_RESULTS.md``), never on the reported ones.  Static per-channel K lost there at every width.

**GroupQueryAttention graphs** (``attention_impl="gqa"``): the cache is the op's own quantized cache
(``kv_cache_bit_width``, ``k_quant_type=v_quant_type=PER_CHANNEL``, inputs ``k_scale``/``v_scale``): static
symmetric per-(head, channel) scales ``s = r/(2^(b−1)−1)`` from calibration (K: ``r`` = the RoPE pair's largest
norm; V and rotated K: the channel's largest |x|), codes ``clip(round(x/s), −2^(b−1), 2^(b−1)−1)`` (int8, or
int4 +8 two per byte); the op reads them without a float copy (faster than the float cache; numbers in
``benchmarks/DECODE_RESULTS.md``).  ``hadamard=true`` rotates Q, K, V and the output per head around the op.
Only ``k_mode=channel`` applies there (no per-token scales, no sink).

Float semantics change only by the quantization error.  Bytes per cached token (all layers, K+V,
stored scales included) are written to the report next to the float figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from lowbit.ir.rewrite import add_initializer, make_node, unique_name
from lowbit.ops.float_ops import hadamard_reference
from lowbit.ops.registry import DOMAIN, attach_functions
from lowbit.passmanager.manager import Pass, PassResult, register_pass

__all__ = ["QuantizeKV"]

logger = logging.getLogger(__name__)
_SHAPE_OPS = {"Unsqueeze", "Transpose", "Reshape", "Expand", "Squeeze"}


def _rope_pairs(model, head_dim) -> tuple[np.ndarray, np.ndarray] | None:
    """Channel indices (a, b) of the RoPE pairs in a cached key, from the frontend's ``lowbit.config``."""
    conf = dict(kv.split("=", 1) for kv in model.metadata_props.get("lowbit.config", "").split(",") if "=" in kv)
    style = conf.get("rope_style")
    if conf.get("positions", "rope") != "rope" or style not in ("half", "interleaved") or not isinstance(head_dim, int):
        return None
    rd = int(conf.get("rotary_dim", "0") or 0) or head_dim
    if style == "interleaved":
        return np.arange(0, rd, 2), np.arange(1, rd, 2)
    return np.arange(rd // 2), np.arange(rd // 2, rd)


@register_pass("quantize-kv")
class QuantizeKV(Pass):
    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        k_mode: Literal["channel", "token"] = "token"
        hadamard: bool = False
        group: int = 0  # channels per (s, min) pair for dynamic per-token groups; 0 = the whole head
        sink: int = 0  # the first `sink` cached positions also kept in float32 and read from there

        def __post_init__(self):
            if self.bits not in (4, 8):
                raise ValueError(f"quantize-kv: bits must be 4 or 8, got {self.bits}")
            if self.k_mode not in ("channel", "token"):
                raise ValueError(f"quantize-kv: k_mode must be channel or token, got {self.k_mode}")
            if self.sink < 0:
                raise ValueError(f"quantize-kv: sink must be >= 0, got {self.sink}")
            if self.group < 0 or self.group % 2:
                raise ValueError(f"quantize-kv: group must be 0 (whole head) or an even channel count, got {self.group}")

    def call(self, model):
        graph = model.graph
        self._graph, self._consts = graph, {}
        gqa = self._gqa_layers(graph)
        if gqa:
            return self._call_gqa(model, gqa)
        layers = self._layers(graph)
        if not layers:
            self.fail("no KV cache: expected outputs present.{i}.key/value = Concat(past_key_values.{i}.*, new)",
                      hint="build the KV-cache form (load_model(..., kv_cache=True), 'lowbit compile --kv-cache') "
                           "with the plain or expand attention core")
        o = self.options
        shape = layers[0][1].outputs[0].shape
        hd = shape[-1] if shape is not None else None
        self._g = hd if not o.group or (isinstance(hd, int) and o.group >= hd) else o.group
        if not isinstance(hd, int) or hd % self._g:
            self.fail(f"group={o.group} does not divide the head dim {hd}", hint="use group=0 (whole head) or a divisor")
        if o.hadamard:
            if not isinstance(hd, int) or hd & (hd - 1):
                self.fail(f"hadamard=true needs a power-of-two head dim, got {hd}", hint="use hadamard=false")
            self._q1 = add_initializer(graph, "kv_hadamard_q", np.ones((1, 1), np.float32))
        k_ranges = self._calibrate(model, layers) if o.k_mode == "channel" else None
        float_bytes = q_bytes = 0
        for i, (kcat, vcat) in enumerate(layers):
            hd, kv = vcat.outputs[0].shape[-1], vcat.outputs[0].shape[1]
            float_bytes += 2 * kv * hd * 4
            if o.hadamard:
                self._rotate_consumer(kcat, side="query")
                self._rotate_consumer(vcat, side="output")
            if k_ranges is not None:
                q_bytes += self._quantize(kcat, "static", k_ranges[i])
            else:
                q_bytes += self._quantize(kcat, "token")
            q_bytes += self._quantize(vcat, "token")
            self.stats["layers"] += 1
        graph.meta.pop("lowbit.names", None)
        attach_functions(model)
        self.ctx.report["quantize-kv"] = {"bits": o.bits, "k_mode": o.k_mode, "hadamard": o.hadamard, "group": o.group,
                                          "layers": self.stats["layers"], "float_bytes_per_token": float_bytes,
                                          "bytes_per_token": q_bytes, "sink_tokens": o.sink,
                                          "sink_bytes": o.sink * float_bytes}
        logger.info("KV cache: %d → %d bytes per cached token", float_bytes, q_bytes)
        return PassResult(model, modified=True)

    # -- GroupQueryAttention's own quantized cache ---------------------------------------------------
    def _gqa_layers(self, graph) -> list[ir.Node]:
        """The ``GroupQueryAttention`` node reading ``past_key_values.{i}.key`` as its past key, per layer."""
        ins, nodes, i = {v.name: v for v in graph.inputs}, [], 0
        while f"past_key_values.{i}.key" in ins:
            users = [u.node for u in ins[f"past_key_values.{i}.key"].uses()
                     if u.node.op_type == "GroupQueryAttention" and u.idx == 3]
            if len(users) != 1:
                return []
            nodes.append(users[0])
            i += 1
        return nodes

    def _call_gqa(self, model, nodes: list[ir.Node]):
        """Static symmetric per-(head, channel) scales handed to GroupQueryAttention (``kv_cache_bit_width``,
        ``k_quant_type=v_quant_type=PER_CHANNEL``, inputs ``k_scale``/``v_scale``): the op quantizes the new
        keys/values itself, ``q = clip(round(x/s), −2^(b−1), 2^(b−1)−1)`` (int8, or int4 packed two per uint8
        byte with +8, low nibble = even channel), and reads the cache without a float copy of it."""
        o, g = self.options, self._graph
        if o.k_mode != "channel" or o.group or o.sink:
            self.fail("GroupQueryAttention's quantized cache takes static per-channel scales only",
                      node=nodes[0], hint="use quantize-kv{k_mode=channel} (no group, no sink), or build the graph "
                                          "with attention_impl='plain' for per-token scales")
        past = {v.name: v for v in g.inputs}
        hd = past["past_key_values.0.key"].shape[-1]
        if o.hadamard and (not isinstance(hd, int) or hd & (hd - 1)):
            self.fail(f"hadamard=true needs a power-of-two head dim, got {hd}", hint="use hadamard=false")
        if o.hadamard:
            self._q1 = add_initializer(g, "kv_hadamard_q", np.ones((1, 1), np.float32))
        ranges = [self._calibrate(model, nodes, kind) for kind in ("key", "value")]
        qmax, dtype = 2 ** (o.bits - 1) - 1, ir.DataType.INT8 if o.bits == 8 else ir.DataType.UINT8
        float_bytes = q_bytes = 0
        for i, node in enumerate(nodes):
            attrs = node.attributes
            heads, kv = attrs["num_heads"].as_int(), attrs["kv_num_heads"].as_int()
            if o.hadamard:  # (qH)(kH)ᵀ = qkᵀ; P·(VH)·H = P·V, per head
                for j, n_heads in ((0, heads), (1, kv), (2, kv)):
                    node.replace_input_with(j, self._per_head_hadamard(node.inputs[j], n_heads, hd, node, f"{i}.{j}"))
                y = node.outputs[0]
                uses = list(y.uses())
                ry = self._per_head_hadamard(y, heads, hd, uses[0].node, f"{i}.out")
                for u in uses:
                    u.node.replace_input_with(u.idx, ry)
            scales = []
            for kind, (centre, half) in zip(("key", "value"), (r[i] for r in ranges)):
                r = np.abs(centre) + half  # symmetric: the largest |x| of the channel
                scales.append(self._const(np.maximum(r / qmax, 1e-8).astype(np.float32).reshape(-1),
                                          f"{kind}_scale.{i}"))
            node.resize_inputs(14)
            node.replace_input_with(12, scales[0])
            node.replace_input_with(13, scales[1])
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", o.bits)
            for a in ("k_quant_type", "v_quant_type"):
                node.attributes[a] = ir.AttrString(a, "PER_CHANNEL")
            for j, kind in ((3, "key"), (4, "value")):
                v_in, v_out = node.inputs[j], node.outputs[j - 2]
                for v in (v_in, v_out):
                    dims = list(v.shape or [None, kv, None, hd])
                    v.type, v.shape = ir.TensorType(dtype), ir.Shape(dims[:3] + [hd * o.bits // 8])
            float_bytes += 2 * kv * hd * 4
            q_bytes += 2 * kv * hd * o.bits // 8
            self.stats["layers"] += 1
        g.meta.pop("lowbit.names", None)
        attach_functions(model)
        self.ctx.report["quantize-kv"] = {"bits": o.bits, "k_mode": o.k_mode, "hadamard": o.hadamard, "group": 0,
                                          "kernel": "GroupQueryAttention", "layers": self.stats["layers"],
                                          "float_bytes_per_token": float_bytes, "bytes_per_token": q_bytes,
                                          "sink_tokens": 0, "sink_bytes": 0}
        logger.info("KV cache (GroupQueryAttention): %d → %d bytes per cached token", float_bytes, q_bytes)
        return PassResult(model, modified=True)

    def _per_head_hadamard(self, x: ir.Value, heads: int, hd: int, before: ir.Node, tag: str) -> ir.Value:
        """[b, s, heads·hd] → the normalised Hadamard of every head's hd channels, same shape."""
        split = self._op("Reshape", [x, self._const(np.array([0, 0, heads, hd], np.int64), "heads")],
                         f"kv.gqa.{tag}.split", before)
        rot = self._op("Hadamard", [split, self._q1], f"kv.gqa.{tag}.hadamard", before)
        return self._op("Reshape", [rot, self._const(np.array([0, 0, heads * hd], np.int64), "flat")],
                        f"kv.gqa.{tag}.merge", before)

    # -- finding the cache ------------------------------------------------------------------------
    def _layers(self, graph) -> list[tuple[ir.Node, ir.Node]]:
        outs = {v.name: v for v in graph.outputs}
        layers, i = [], 0
        while f"present.{i}.key" in outs and f"present.{i}.value" in outs:
            pair = []
            for kv in ("key", "value"):
                node = outs[f"present.{i}.{kv}"].producer()
                past = node.inputs[0] if node is not None and node.op_type == "Concat" else None
                if past is None or past.name != f"past_key_values.{i}.{kv}" or past not in graph.inputs:
                    self.fail(f"present.{i}.{kv} is not Concat(past_key_values.{i}.{kv}, new)", node=node,
                              hint="the opset-23 Attention core keeps the cache inside the op; build with "
                                   "attention_impl='plain'")
                if outs[f"present.{i}.{kv}"].dtype != ir.DataType.FLOAT:
                    self.fail(f"present.{i}.{kv} is already {outs[f'present.{i}.{kv}'].dtype}: quantize-kv ran twice?")
                pair.append(node)
            layers.append(tuple(pair))
            i += 1
        return layers

    def _calibrate(self, model, layers, kind: str = "key") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-(head, channel) centre and half-range of the keys (values) entering each layer's cache (module
        doc); ``layers`` only counts the layers, the graph's ``present.{i}.key`` outputs give the head dim."""
        from lowbit.ir.sessions import make_session

        feeds = self.ctx.calibration
        if not feeds:
            self.fail("k_mode=channel needs calibration samples", hint="pass --calibration, or use k_mode=token")
        names = [f"present.{i}.{kind}" for i in range(len(layers))]
        sess = make_session(model)
        wanted = {i.name for i in sess.get_inputs()}
        hd = next(v for v in model.graph.outputs if v.name == names[0]).shape[-1]
        pairs = None if self.options.hadamard or kind != "key" else _rope_pairs(model, hd)
        lo, hi, norm = [None] * len(names), [None] * len(names), [None] * len(names)
        for feed in feeds:
            res = sess.run(names, {k: v for k, v in feed.items() if k in wanted})
            for j, k in enumerate(res):
                if self.options.hadamard:
                    k = hadamard_reference(k, np.ones((1, 1), np.float32))
                mn, mx = k.min(axis=(0, 2)), k.max(axis=(0, 2))  # [kv, head_dim]
                lo[j] = mn if lo[j] is None else np.minimum(lo[j], mn)
                hi[j] = mx if hi[j] is None else np.maximum(hi[j], mx)
                if pairs is not None:
                    a, b = pairs
                    pn = np.sqrt(k[..., a] ** 2 + k[..., b] ** 2).max(axis=(0, 2))  # [kv, pairs]
                    norm[j] = pn if norm[j] is None else np.maximum(norm[j], pn)
        out = []
        for j in range(len(names)):
            centre, half = (hi[j] + lo[j]) / 2, (hi[j] - lo[j]) / 2
            if pairs is not None:
                for idx in pairs:
                    centre[:, idx], half[:, idx] = 0.0, norm[j]
            out.append((centre, half))
        return out

    # -- rewriting ---------------------------------------------------------------------------------
    def _op(self, op_type, inputs, name, before, **attrs) -> ir.Value:
        node = make_node(self._graph, op_type, inputs, origin=self.name, name=name, attributes=attrs,
                         domain=DOMAIN if op_type == "Hadamard" else "", before=before)
        return node.outputs[0]

    def _const(self, array, base: str) -> ir.Value:
        arr = np.asarray(array)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = add_initializer(self._graph, f"kv.{base}", arr)
        return self._consts[key]

    def _rotate_consumer(self, cat: ir.Node, side: str) -> None:
        """Find the attention MatMul reading the cache; rotate its query input or its output by H."""
        todo, matmul = list(cat.outputs[0].uses()), None
        while todo:
            use = todo.pop()
            if use.node.op_type in _SHAPE_OPS and use.idx == 0:
                todo.extend(use.node.outputs[0].uses())
            elif use.node.op_type == "MatMul" and use.idx == 1:
                matmul = use.node
        if matmul is None:
            self.fail("cannot find the attention MatMul that reads the cache", node=cat)
        name = cat.name or cat.outputs[0].name
        if side == "query":
            q = self._op("Hadamard", [matmul.inputs[0], self._q1], f"{name}.q_hadamard", matmul)
            matmul.replace_input_with(0, q)
        else:
            out = matmul.outputs[0]
            consumers = [u for u in out.uses()]
            y = self._op("Hadamard", [out, self._q1], f"{name}.ctx_hadamard", consumers[0].node)
            for u in consumers:
                u.node.replace_input_with(u.idx, y)
        self.stats["hadamard"] += 1

    def _quantize(self, cat: ir.Node, mode: str, ranges=None) -> int:
        """Rewrite one Concat(past, new) → present into the quantized cache; return its bytes per token."""
        g, o = self._graph, self.options
        past, new = cat.inputs[0], cat.inputs[1]
        present = cat.outputs[0]
        name, b = present.name, o.bits
        qmax = float(2 ** b - 1)
        hd, kv = present.shape[-1], present.shape[1]
        f32 = lambda x: self._const(np.array(x, np.float32), "c")  # noqa: E731
        op = lambda t, ins, suffix, **a: self._op(t, ins, f"{name}.{suffix}", cat, **a)  # noqa: E731
        x = op("Hadamard", [new, self._q1], "hadamard") if o.hadamard else new
        side = None
        if mode == "static":
            centre, r = ranges
            centre = centre.astype(np.float32)[None, :, None, :]
            half = 2 ** (b - 1)
            scale = np.maximum(r / (half - 1), 1e-8).astype(np.float32)[None, :, None, :]
            c, s = self._const(centre, f"{name}.centre"), self._const(scale, f"{name}.scale")
            codes = op("Add", [op("Round", [op("Div", [op("Sub", [x, c], "centred"), s], "scaled")], "round"),
                               f32(half)], "offset")
            codes = op("Clip", [codes, f32(0.0), f32(qmax)], "clip")
        else:
            groups = hd // self._g
            xg = op("Reshape", [x, self._const(np.array([0, 0, 0, groups, hd // groups], np.int64), "g")], "grouped")
            mn = op("ReduceMin", [xg, self._const(np.array([-1], np.int64), "last")], "min", keepdims=1)
            mx = op("ReduceMax", [xg, self._const(np.array([-1], np.int64), "last")], "max", keepdims=1)
            s = op("Max", [op("Div", [op("Sub", [mx, mn], "range"), f32(qmax)], "step"), f32(1e-8)], "step_pos")
            params = op("Cast", [op("Concat", [s, mn], "params", axis=-1)], "params_f16", to=ir.DataType.FLOAT16)
            exact = op("Cast", [params], "params_f32", to=ir.DataType.FLOAT)
            s, mn = (op("Slice", [exact, self._const(np.array([a]), "i"), self._const(np.array([a + 1]), "i"),
                                  self._const(np.array([-1]), "i")], f"param{a}") for a in (0, 1))
            codes = op("Clip", [op("Round", [op("Div", [op("Sub", [xg, mn], "shifted"), s], "scaled")], "round"),
                                f32(0.0), f32(qmax)], "clip")
            codes = op("Reshape", [codes, self._const(np.array([0, 0, 0, hd], np.int64), "heads")], "ungrouped")
            flat = op("Reshape", [params, self._const(np.array([0, 0, 0, 2 * groups], np.int64), "p")], "params_flat")
            side = self._cache_io(cat, f"{name}_scale", ir.DataType.FLOAT16, 2 * groups, flat)
        if b == 4:
            pairs = op("Reshape", [codes, self._const(np.array([0, 0, 0, hd // 2, 2], np.int64), "pairs")], "pairs")
            lo_hi = op("Mul", [pairs, f32(np.array([1.0, 16.0], np.float32))], "nibbles")
            codes = op("ReduceSum", [lo_hi, self._const(np.array([-1], np.int64), "last")], "pack", keepdims=0)
        codes = op("Cast", [codes], "u8", to=ir.DataType.UINT8)
        stored = self._cache_io(cat, name, ir.DataType.UINT8, hd * b // 8, codes)
        vals = stored
        if b == 4:
            lo = op("BitwiseAnd", [stored, self._const(np.array(15, np.uint8), "mask")], "lo")
            hi = op("BitShift", [stored, self._const(np.array(4, np.uint8), "shift")], "hi",
                    direction=ir.AttrString("direction", "RIGHT"))
            both = op("Concat", [op("Unsqueeze", [lo, self._const(np.array([-1], np.int64), "last")], "lo_e"),
                                 op("Unsqueeze", [hi, self._const(np.array([-1], np.int64), "last")], "hi_e")],
                      "unpack", axis=-1)
            vals = op("Reshape", [both, self._const(np.array([0, 0, 0, hd], np.int64), "heads")], "codes")
        vals = op("Cast", [vals], "codes_f32", to=ir.DataType.FLOAT)
        if mode == "static":
            deq = op("Add", [op("Mul", [op("Sub", [vals, f32(2 ** (b - 1))], "signed"), s], "rescaled"), c], "dequant")
        else:
            sp = op("Reshape", [side, self._const(np.array([0, 0, 0, groups, 2], np.int64), "pg")], "cache_params")
            ss = op("Slice", [sp, self._const(np.array([0]), "i"), self._const(np.array([1]), "i"),
                              self._const(np.array([-1]), "i")], "cache_step")
            sm = op("Slice", [sp, self._const(np.array([1]), "i"), self._const(np.array([2]), "i"),
                              self._const(np.array([-1]), "i")], "cache_min")
            ss = op("Cast", [ss], "cache_step_f32", to=ir.DataType.FLOAT)
            sm = op("Cast", [sm], "cache_min_f32", to=ir.DataType.FLOAT)
            vg = op("Reshape", [vals, self._const(np.array([0, 0, 0, groups, hd // groups], np.int64), "g")], "codes_g")
            deq = op("Add", [op("Mul", [vg, ss], "rescaled"), sm], "dequant_g")
            deq = op("Reshape", [deq, self._const(np.array([0, 0, 0, hd], np.int64), "heads")], "dequant")
        if o.sink:  # attention reads the first positions from a float copy (IntactKV / PrefixQuant's sinks)
            kept = self._cache_io(cat, f"{name}_sink", ir.DataType.FLOAT, hd, x, keep=o.sink)
            n = op("Shape", [kept], "sink_len", start=2, end=3)
            rest = op("Slice", [deq, n, self._const(np.array([2 ** 62], np.int64), "end"),
                                self._const(np.array([2], np.int64), "axis2")], "after_sink")
            deq = op("Concat", [kept, rest], "with_sink", axis=2)
        for u in list(present.uses()):
            u.node.replace_input_with(u.idx, deq)
        g.remove(cat, safe=False)
        return kv * (hd * b // 8 + (4 * (hd // self._g) if mode == "token" else 0))

    def _cache_io(self, cat: ir.Node, present_name: str, dtype, last: int, new: ir.Value, keep: int = 0) -> ir.Value:
        """Make (or re-type) the past input and present output ``present_name`` holding ``new`` along axis 2
        (only the first ``keep`` positions when ``keep``)."""
        g = self._graph
        past_name = present_name.replace("present.", "past_key_values.", 1)
        old_past = next((v for v in g.inputs if v.name == past_name), None)
        shape = ir.Shape([d for d in (cat.inputs[0].shape or [])][:3] + [last])
        past = ir.Value(name=past_name if old_past is None else unique_name(g, past_name), shape=shape,
                        type=ir.TensorType(dtype))
        if old_past is not None:
            g.inputs[g.inputs.index(old_past)] = past
            old_past.name = unique_name(g, f"{past_name}.float")
            past.name = past_name
        else:
            g.inputs.append(past)
        out = self._op("Concat", [past, new], f"{present_name}.cache", cat, axis=2)
        if keep:
            out = self._op("Slice", [out, self._const(np.array([0], np.int64), "zero"),
                                     self._const(np.array([keep], np.int64), "keep"),
                                     self._const(np.array([2], np.int64), "axis2")], f"{present_name}.first", cat)
        old_out = next((v for v in g.outputs if v.name == present_name), None)
        out_shape = ir.Shape([d for d in (cat.outputs[0].shape or [])][:3] + [last])
        if old_out is not None:
            old_out.name = unique_name(g, f"{present_name}.float")
            g.outputs[g.outputs.index(old_out)] = out
        else:
            g.outputs.append(out)
        out.name, out.dtype, out.shape = present_name, dtype, out_shape
        return out
