"""Token ids → feeds for any causal-LM graph form: plain (one token input), Hugging Face / optimum
(``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.*``), onnxruntime-genai
(``past_key_values.*`` with a ``total_sequence_length``-style mask) and fixed-shape exports.

Every sample is a *prefill*: the past key/value inputs are fed empty along their dynamic
sequence axis (a valid first step of generation), the attention mask is all ones, positions
count from 0.  Sequences are cut to the model's context length (:func:`context_length`).  A
fixed-length token input is padded with id 0 under a zero attention mask where the model has a
mask; without a mask, samples shorter than the fixed length are dropped.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from lowbit.errors import CalibrationError

__all__ = ["context_length", "token_input", "lm_feeds", "DEFAULT_CONTEXT"]

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 256
_META_KEYS = ("lowbit.context", "max_position_embeddings", "context_length", "n_positions", "n_ctx")


def _inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def token_input(model: ir.Model) -> ir.Value | None:
    """The token-id input: ``input_ids``/``tokens`` by name, else the only integer input of rank 2."""
    ins = _inputs(model)
    for v in ins:
        if v.name in ("input_ids", "tokens", "input", "ids"):
            return v
    ints = [v for v in ins if v.dtype in (ir.DataType.INT64, ir.DataType.INT32) and v.shape is not None
            and len(v.shape) == 2 and "mask" not in v.name and "position" not in v.name and "type" not in v.name]
    return ints[0] if len(ints) == 1 else None


def _static_dim(v: ir.Value, axis: int) -> int | None:
    if v.shape is None or len(v.shape) <= axis:
        return None
    d = v.shape[axis]
    return d if isinstance(d, int) else None


_MIN_POSITIONS = 8  # fewer rows: a token-type table (BERT 2, RoBERTa 1), not positions


def context_length(model: ir.Model) -> int | None:
    """The longest sequence the graph accepts, from metadata, a fixed token axis, or its position tables.

    Position tables: constant 2-D tables read row-wise by any index but the token ids (learned
    positions of GPT-2/OPT/BERT; two rows kept spare for OPT's offset) or
    sliced along rows (precomputed RoPE caches).  None: nothing in the graph bounds the length.
    """
    for key in _META_KEYS:
        val = model.metadata_props.get(key)
        if val and str(val).isdigit():
            return int(val)
    for key, val in model.metadata_props.items():  # frontends' "k=v,k=v" configs (llama2.c: seq_len=…)
        if key.startswith("lowbit.") and "=" in str(val):
            pairs = dict(p.split("=", 1) for p in str(val).split(",") if "=" in p)
            for name in ("seq_len", "context_length", "max_position_embeddings", "n_positions"):
                if pairs.get(name, "").isdigit() and int(pairs[name]) > 0:
                    return int(pairs[name])
    tok = token_input(model)
    if tok is not None and _static_dim(tok, 1):
        return _static_dim(tok, 1)
    bounds = []
    for node in model.graph:
        data = node.inputs[0] if node.inputs else None
        if data is None or data.const_value is None or len(data.const_value.shape) != 2:
            continue
        rows = data.const_value.shape[0]
        if rows < _MIN_POSITIONS:  # token-type tables (BERT's 2 rows, read by a folded zeros buffer)
            continue
        if node.op_type == "Gather" and len(node.inputs) > 1 and _attr(node, "axis", 0) == 0 \
                and not _reads(node.inputs[1], tok):
            bounds.append(rows - 2 if rows > 4 else rows)
        elif node.op_type == "Slice":
            axes = node.inputs[3] if len(node.inputs) > 3 else None
            ax = None if axes is None or axes.const_value is None else axes.const_value.numpy().ravel().tolist()
            if ax in (None, [0]):
                bounds.append(rows)
    return min(bounds) if bounds else None


def _reads(v: ir.Value | None, source: ir.Value | None) -> bool:
    """``v`` is ``source`` reshaped or cast (the token embedding's index is the token input)."""
    while v is not None and v is not source:
        node = v.producer()
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Flatten", "Identity"):
            return False
        v = node.inputs[0]
    return v is not None and source is not None


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _past_shape(model: ir.Model, v: ir.Value) -> list[int]:
    """An empty KV past for ``v``: batch 1, the (dynamic) sequence axis 0, a dynamic head size from the
    exporter's config (``lowbit.head_size``)."""
    shape = list(v.shape or [])
    out = []
    for i, d in enumerate(shape):
        if isinstance(d, int):
            out.append(d)
        elif i == 0:
            out.append(1)
        elif i == len(shape) - 1 and len(shape) >= 3 and "seq" not in str(d) and "past" not in str(d):
            head = model.metadata_props.get("lowbit.head_size")
            if not head:
                raise CalibrationError(f"text calibration: input '{v.name}' has a dynamic head size '{d}'",
                                       hint="keep the exporter's genai_config.json/config.json beside the model, "
                                            "or give a directory of .npz samples")
            out.append(int(head))
        else:
            out.append(0)
    return out


def lm_feeds(model: ir.Model, token_lists: list[list[int]], max_len: int | None = None) -> list[dict]:
    """One prefill feed per token list, shaped for every input of ``model``."""
    tok = token_input(model)
    if tok is None:
        names = [v.name for v in _inputs(model)]
        raise CalibrationError(f"text calibration: cannot tell which of the inputs {names} takes token ids",
                               hint="name it input_ids, or give a directory of .npz samples")
    ctx = context_length(model)
    limit = min(x for x in (max_len, ctx) if x) if (max_len or ctx) else DEFAULT_CONTEXT
    fixed = _static_dim(tok, 1)
    ins = _inputs(model)
    names = {v.name for v in ins}
    has_mask = "attention_mask" in names
    if fixed and not has_mask and any(len(t) < fixed for t in token_lists):
        logger.info("fixed length %d without a mask: short samples are dropped", fixed)
    feeds = []
    for ids in token_lists:
        ids = list(ids)[:limit]
        n = len(ids)
        if fixed:
            if n < fixed and not has_mask:
                continue
            ids = ids + [0] * (fixed - n)
        if not ids:
            continue
        length = len(ids)
        feed = {}
        for v in ins:
            dt = v.dtype.numpy() if v.dtype is not None else np.int64
            if v is tok:
                feed[v.name] = np.array([ids], dtype=dt)
            elif "mask" in v.name and v.shape is not None and len(v.shape) == 2:
                mask = np.zeros((1, length), dt)
                mask[0, :n] = 1
                feed[v.name] = mask
            elif "position" in v.name:
                feed[v.name] = np.arange(length, dtype=dt)[None, :]
            elif "type" in v.name or "segment" in v.name:
                feed[v.name] = np.zeros((1, length), dt)
            elif "past" in v.name or "cache" in v.name:
                feed[v.name] = np.zeros(_past_shape(model, v), dt)
            elif v.shape is not None and len(v.shape) == 0 and np.issubdtype(dt, np.integer):
                feed[v.name] = np.array(length, dt)  # total sequence length (genai)
            else:
                raise CalibrationError(f"text calibration: does not know what to feed input '{v.name}' "
                                       f"(shape {v.shape}, {v.dtype})", hint="give a directory of .npz samples")
        feeds.append(feed)
    return feeds
