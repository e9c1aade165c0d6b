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
* ``"onnx"``: the opset-23 ``Attention`` op (past/present handled by the op).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from lowbit.errors import UnsupportedModelError

__all__ = ["causal_bias", "rope_angles", "apply_rope", "attention", "IMPLS", "inv_freq"]

IMPLS = ("plain", "expand", "onnx")
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
