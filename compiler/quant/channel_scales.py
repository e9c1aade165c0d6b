"""Folding per-input-channel scales into a linear group (SmoothQuant, AWQ).

``X·W = (X·diag(s)⁻¹)·(diag(s)·W)``: ``s`` multiplies the rows of every consumer's weight and
``1/s`` folds into the producer of X — a norm's γ (and β), or the previous linear's output columns
and bias (up→down through SwiGLU's gated product, V→O through attention, where ``channel_map``
maps each consumer input channel to its producer channel, e.g. GQA's KV heads).  No node is added,
so float outputs are unchanged up to rounding.  The calibration statistics of X are rescaled to match.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from lowbit.ir.analysis import NORM_INPUTS, Group
from lowbit.ir.rewrite import set_input_const
from lowbit.quant.stats import act_stats

__all__ = ["consumer_scales", "fold_channel_scales"]


def consumer_scales(group: Group, s: np.ndarray) -> np.ndarray:
    """``s`` (one per producer channel) expanded to the consumers' input channels."""
    return s[group.channel_map] if group.kind == "linear" else s


def fold_channel_scales(graph: ir.Graph, group: Group, s: np.ndarray,
                        fail: Callable[..., None]) -> None:
    """Fold ``s`` into ``group``'s consumers and ``1/s`` into its producer; ``fail(msg, node=)`` refuses."""
    sc = consumer_scales(group, s)
    for lin in group.consumers:  # s into the weight rows
        w = lin.weight.const_value.numpy()
        set_input_const(graph, lin.node, 1, w * sc[:, None].astype(w.dtype))
    if group.kind == "norm":  # 1/s into γ (and β)
        norm = group.producer
        for idx in NORM_INPUTS[norm.op_type]:
            if idx is not None and idx < len(norm.inputs) and norm.inputs[idx] is not None:
                arr = norm.inputs[idx].const_value
                if arr is None:
                    fail("norm scale is not a constant", node=norm)
                set_input_const(graph, norm, idx, arr.numpy() / s.astype(np.float32))
    else:  # 1/s into the previous linear's output columns and bias
        prev = group.producer_linear
        w = prev.weight.const_value.numpy()
        set_input_const(graph, prev.node, 1, w / s[None, :].astype(w.dtype))
        if prev.bias is not None:
            idx = list(prev.bias_node.inputs).index(prev.bias)
            set_input_const(graph, prev.bias_node, idx, prev.bias.const_value.numpy() / s.astype(np.float32))
    act_stats(group.activation).scale_channels(sc)
