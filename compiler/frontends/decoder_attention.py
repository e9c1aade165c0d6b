"""Attention pieces of :mod:`lowbit.frontends.decoder`: the additive mask, RoPE, and the attention core.

The mask is an additive float bias ``0`` (attend) / float32-lowest (not), built once per window
size from the key/query positions (and the padding mask in the KV form).  RoPE angles are
``position · inv_freq`` computed in the graph (no table, so any position works), with
``inv_freq = θ^(-2i/rot)`` adjusted by linear or Llama-3 scaling.

Three attention cores compute the same function (``impl``):

* ``"plain"`` (default): standard ops; the ``kv_heads`` cache is shared by its ``group`` query
  heads through a 5-D broadcasting MatMul (``[b, kv, group, s, d] @ [b, kv, 1, d, t]``), so the
  cache is never copied per query head;
* ``"expand"``: standard ops, the cache repeated per query head with Expand (llama2.c's old form);
* ``"onnx"``: the opset-23 ``Attention`` op (past/present handled by the op);
* ``"gqa"``: onnxruntime's ``com.microsoft.GroupQueryAttention`` (lengths instead of a mask: rows
  must be right-padded; no softcap or sliding window here).

Why ``plain`` is the default (``benchmarks/kv_attention.py --layers 4 --threads 1 --cpu-time``,
SmolLM2-135M shape, CPU time of one decode step, fastest of 20, on a shared 2-core machine):
attention at a 4096-token context costs plain 4.6 ms, opset-23 Attention 4.1 ms, GroupQueryAttention
4.4 ms, expand 9.4 ms (decode at context 16: 9.6–10.1 ms for all; prefill of 256: 222–225 ms for
all).  The three fast cores are within the noise of each other; the standard-op form is the one
every lowbit pass, the TVM backend and a padding/sliding-window/softcap mask all work on, so it is
the default; the repeated-cache form costs twice the attention time and is kept only for comparison.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from lowbit.errors import UnsupportedModelError

__all__ = ["causal_bias", "rope_angles", "apply_rope", "attention", "IMPLS", "inv_freq", "gqa_lengths"]

IMPLS = ("plain", "expand", "onnx", "gqa")
_LOWEST = float(np.finfo(np.float32).min)


def causal_bias(g, ids: str, mask: str | None, window: int, impl: str) -> str:
    """[seq, total] (cache-less) or [batch, 1, seq, total] additive bias; 5-D for ``plain``."""
    seq = g.op("Squeeze", [g.op("Slice", [g.op("Shape", [ids]), g.const([1]), g.const([2])])], name="mask.seq")
    if mask is None:
        total, past = seq, g.const(0)
    else:
        total = g.op("Squeeze", [g.op("Slice", [g.op("Shape", [mask]), g.const([1]), g.const([2])])],
                     name="mask.total")
        past = g.op("Sub", [total, seq], name="mask.past")
    qpos = g.op("Unsqueeze", [g.op("Range", [past, total, g.const(1)], name="mask.qpos"), g.const([1])])
    kpos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)], name="mask.kpos"), g.const([0])])
    allowed = g.op("LessOrEqual", [kpos, qpos], name=f"mask.causal_w{window}")
    if window:
        near = g.op("Greater", [kpos, g.op("Sub", [qpos, g.const(window)])], name=f"mask.window_w{window}")
        allowed = g.op("And", [allowed, near], name=f"mask.sliding_w{window}")
    if mask is not None:
        keep = g.op("Unsqueeze", [g.op("Cast", [mask], name="mask.bool", to=TensorProto.BOOL), g.const([1, 2])],
                    name="mask.keys")
        allowed = g.op("And", [allowed, keep], name=f"mask.padded_w{window}")
    bias = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(_LOWEST, np.float32)], name=f"mask.bias_w{window}")
    if impl == "plain" and mask is not None:
        bias = g.op("Unsqueeze", [bias, g.const([1])], name=f"mask.bias5d_w{window}")
    return bias


def gqa_lengths(g, ids: str, mask: str | None) -> tuple[str, str]:
    """(seqlens_k int32 [batch], total_sequence_length int32 scalar) for GroupQueryAttention.

    GroupQueryAttention takes lengths, not a mask: every row is assumed right-padded (batch 1 in practice)."""
    if mask is None:
        shape = g.op("Shape", [ids], name="gqa.shape")
        total = g.op("Squeeze", [g.op("Slice", [shape, g.const([1]), g.const([2])])], name="gqa.seq")
        batch = g.op("Slice", [shape, g.const([0]), g.const([1])], name="gqa.batch")
        lens = g.op("Expand", [g.op("Sub", [total, g.const(1)]), batch], name="gqa.lens")
    else:
        total = g.op("Squeeze", [g.op("Slice", [g.op("Shape", [mask]), g.const([1]), g.const([2])])], name="gqa.total")
        lens = g.op("Sub", [g.op("ReduceSum", [mask, g.const([1])], keepdims=0, name="gqa.count"), g.const(1)],
                    name="gqa.lens")
    return (g.op("Cast", [lens], name="gqa.seqlens_k", to=TensorProto.INT32),
            g.op("Cast", [total], name="gqa.total_len", to=TensorProto.INT32))


def inv_freq(spec, local: bool = False) -> np.ndarray:
    """θ^(-2i/rot) for the global layers (scaled) or Gemma-3's local layers (own θ, unscaled)."""
    rot, theta = spec.rot, spec.local_rope_theta if local else spec.rope_theta
    f = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)))
    if spec.rope_freq_factors and not local:  # llama.cpp's rope_freqs: per-frequency divisors
        f = f / np.asarray(spec.rope_freq_factors, dtype=np.float32)
    kind = spec.rope_scaling[0] if (spec.rope_scaling and not local) else "default"
    if kind == "linear":
        f = f / spec.rope_scaling[1]
    elif kind == "llama3":
        factor, low, high, orig = spec.rope_scaling[1:]
        wavelen = 2 * math.pi / f
        low_wl, high_wl = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wl, f / factor, f)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelen >= high_wl) & (wavelen <= low_wl)
        f = np.where(between, mid, scaled)
    elif kind != "default":
        raise UnsupportedModelError(f"{spec.arch}: RoPE scaling '{kind}' is not implemented",
                                    hint="supported: default, linear, llama3")
    return np.asarray(f, dtype=np.float32)


def rope_angles(g, pos: str, spec, local: bool = False) -> tuple[str, str]:
    """cos, sin of ``position · inv_freq``, shaped [batch, seq, 1, rot/2]."""
    t = "rope_local" if local else "rope"
    posf = g.op("Unsqueeze", [g.op("Cast", [pos], name=f"{t}.posf", to=TensorProto.FLOAT), g.const([-1])])
    ang = g.op("Mul", [posf, g.init(f"{t}.inv_freq", inv_freq(spec, local))], name=f"{t}.angles")
    ang = g.op("Unsqueeze", [ang, g.const([2])], name=f"{t}.heads")
    return g.op("Cos", [ang], name=f"{t}.cos"), g.op("Sin", [ang], name=f"{t}.sin")


def apply_rope(g, x: str, cs: tuple[str, str], spec, name: str) -> str:
    """Rotate x [batch, seq, heads, head_dim] (first ``rot`` dims; the rest pass through)."""
    cos, sin = cs
    rot, hd = spec.rot, spec.head_dim
    rest = None
    if rot < hd:
        x, rest = g.op("Split", [x, g.const([rot, hd - rot])], name=f"{name}.partial", outputs=2, axis=-1)
    if spec.rope_style == "half":
        a, b = g.op("Split", [x], name=f"{name}.halves", outputs=2, axis=-1, num_outputs=2)
    else:
        pairs = g.op("Reshape", [x, g.const([0, 0, 0, rot // 2, 2])], name=f"{name}.pairs")
        a, b = g.op("Split", [pairs], name=f"{name}.split", outputs=2, axis=-1, num_outputs=2)
        a = g.op("Squeeze", [a, g.const([-1])], name=f"{name}.even")
        b = g.op("Squeeze", [b, g.const([-1])], name=f"{name}.odd")
    ra = g.op("Sub", [g.op("Mul", [a, cos]), g.op("Mul", [b, sin])], name=f"{name}.rot_a")
    rb = g.op("Add", [g.op("Mul", [b, cos]), g.op("Mul", [a, sin])], name=f"{name}.rot_b")
    if spec.rope_style == "half":
        y = g.op("Concat", [ra, rb], name=f"{name}.join", axis=-1)
    else:
        y = g.op("Concat", [g.op("Unsqueeze", [ra, g.const([-1])]), g.op("Unsqueeze", [rb, g.const([-1])])],
                 name=f"{name}.join", axis=-1)
        y = g.op("Reshape", [y, g.const([0, 0, 0, rot])], name=f"{name}.interleave")
    if rest is not None:
        y = g.op("Concat", [y, rest], name=f"{name}.with_pass", axis=-1)
    return y


def attention(e, q: str, k: str, v: str, bias: str, past, present, p: str, impl: str) -> str:
    """q [b, s, H, d], k/v [b, s, KV, d] → context [b, s, H·d]; writes ``present`` when given."""
    g, s = e.g, e.spec
    H, KV, hd = s.n_heads, s.n_kv_heads, s.head_dim
    group = H // KV
    scale = s.attn_scale or 1.0 / math.sqrt(hd)
    kt = g.op("Transpose", [k], name=f"{p}.attn.k_bhsd", perm=[0, 2, 1, 3])
    vt = g.op("Transpose", [v], name=f"{p}.attn.v_bhsd", perm=[0, 2, 1, 3])
    if impl == "gqa":  # com.microsoft GroupQueryAttention; ``bias`` is (seqlens_k, total_sequence_length)
        if s.attn_softcap or any(s.window(i) for i in range(s.n_layers)):
            raise UnsupportedModelError(f"{s.arch}: attention_impl='gqa' does not do softcap or sliding windows here")
        q3 = g.op("Reshape", [q, g.const([0, 0, H * hd])], name=f"{p}.attn.q_flat")
        k3 = g.op("Reshape", [k, g.const([0, 0, KV * hd])], name=f"{p}.attn.k_flat")
        v3 = g.op("Reshape", [v, g.const([0, 0, KV * hd])], name=f"{p}.attn.v_flat")
        if past:
            y, _, _ = g.op("GroupQueryAttention", [q3, k3, v3, past[0], past[1], *bias], name=f"{p}.attn.core",
                           outputs=3, domain="com.microsoft", num_heads=H, kv_num_heads=KV, scale=scale)
            node = g.nodes[-1]
            node.output[1], node.output[2] = present
            return y
        return g.op("GroupQueryAttention", [q3, k3, v3, "", "", *bias], name=f"{p}.attn.core",
                    domain="com.microsoft", num_heads=H, kv_num_heads=KV, scale=scale)
    if impl == "onnx":
        qt = g.op("Transpose", [q], name=f"{p}.attn.q_bhsd", perm=[0, 2, 1, 3])
        attrs = {"scale": scale, "is_causal": 0}
        if s.attn_softcap:
            attrs["softcap"] = s.attn_softcap
        if past:
            y, _, _ = g.op("Attention", [qt, kt, vt, bias, *past], name=f"{p}.attn.core", outputs=3, **attrs)
            # rename the op's present outputs to the graph outputs
            node = g.nodes[-1]
            node.output[1], node.output[2] = present
        else:
            y = g.op("Attention", [qt, kt, vt, bias], name=f"{p}.attn.core", **attrs)
        y = g.op("Transpose", [y], name=f"{p}.attn.bshd", perm=[0, 2, 1, 3])
        return g.op("Reshape", [y, g.const([0, 0, H * hd])], name=f"{p}.attn.merge")
    if past:
        kt = g.op("Concat", [past[0], kt], name=f"{p}.attn.k_cache", out=present[0], axis=2)
        vt = g.op("Concat", [past[1], vt], name=f"{p}.attn.v_cache", out=present[1], axis=2)
    if impl == "expand":
        qt = g.op("Transpose", [q], name=f"{p}.attn.q_bhsd", perm=[0, 2, 1, 3])
        if group > 1:
            kt, vt = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]),
                                                       g.const([1, 1, group, 1, 1])], name=f"{p}.attn.{n}.expand"),
                                       g.const([0, H, -1, hd])], name=f"{p}.attn.{n}.repeat")
                      for t, n in ((kt, "k"), (vt, "v")))
        back, merge = [0, 2, 1, 3], [0, 0, H * hd]
    else:  # plain: [b, kv, group, s, d] against [b, kv, 1, t, d]
        qt = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, KV, group, hd])], name=f"{p}.attn.q_groups")],
                  name=f"{p}.attn.q_bkgsd", perm=[0, 2, 3, 1, 4])
        kt = g.op("Unsqueeze", [kt, g.const([2])], name=f"{p}.attn.k_shared")
        vt = g.op("Unsqueeze", [vt, g.const([2])], name=f"{p}.attn.v_shared")
        back, merge = [0, 3, 1, 2, 4], [0, 0, H * hd]
    perm = [0, 1, 3, 2] if impl == "expand" else [0, 1, 2, 4, 3]
    scores = g.op("MatMul", [qt, g.op("Transpose", [kt], name=f"{p}.attn.kT", perm=perm)], name=f"{p}.attn.qk")
    scores = g.op("Mul", [scores, g.const(scale, np.float32)], name=f"{p}.attn.scale")
    if s.attn_softcap:
        scores = e.softcap(scores, s.attn_softcap, f"{p}.attn.softcap")
    probs = g.op("Softmax", [g.op("Add", [scores, bias], name=f"{p}.attn.mask")], name=f"{p}.attn.softmax", axis=-1)
    ctx = g.op("MatMul", [probs, vt], name=f"{p}.attn.pv")
    ctx = g.op("Transpose", [ctx], name=f"{p}.attn.bshd", perm=back)
    return g.op("Reshape", [ctx, g.const(merge)], name=f"{p}.attn.merge")
