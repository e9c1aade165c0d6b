"""MixLLM's split: ``assign-bits{split=f}`` lets the f·N MOST sensitive output columns of a layer take
other bits.  Sensitivity of column n here is written from the formula ``Σ_j H_jj ΔW_jn²`` with
``H = XᵀX`` of the layer's real inputs (ORT runs the float model, numpy does the rest) and ΔW the
error of asymmetric min-max round-to-nearest at the smallest candidate (bits, group).  A split that
picked the least sensitive columns, or random ones, fails.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.passmanager.manager import PassManager
from lowbit_models import calibrated_small_llama
from onnx_text import ort_outputs

BITS, GROUP, SPLIT = 2, 32, 0.25


def _rtn_error(w: np.ndarray) -> np.ndarray:
    k, n = w.shape
    out = np.zeros_like(w, np.float64)
    qmax = 2 ** BITS - 1
    for g0 in range(0, k, GROUP):
        blk = w[g0:g0 + GROUP].astype(np.float32)
        lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
        scale = np.where(hi > lo, (hi - lo) / np.float32(qmax), np.float32(1)).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, qmax)
        out[g0:g0 + GROUP] = (np.clip(np.round(blk / scale) + zero, 0, qmax) - zero) * scale - blk
    return out


def _linear_inputs(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    """XᵀX diagonal of every linear's input, from ORT runs of a copy exposing those inputs."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    lins = find_linears(copy.graph)
    values = list({lin.input: None for lin in lins})
    copy.graph.outputs.extend(values)
    sums = [0.0] * len(values)
    for f in feeds:
        outs = ort_outputs(copy, f)[-len(values):]
        for i, x in enumerate(outs):
            sums[i] = sums[i] + (x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2).sum(0)
    by_value = dict(zip(values, sums))
    return {lin.name: by_value[lin.input] for lin in lins}


@pytest.fixture(scope="module")
def planned():
    model, ctx = calibrated_small_llama()
    hdiag = _linear_inputs(model, ctx.calibration)
    pipeline = f"assign-bits{{target=3.0,bits=2:4,groups={GROUP},split={SPLIT},budget=nominal_bits}}"
    PassManager.from_pipeline(pipeline, ctx).run(model)
    return model, hdiag


def test_split_takes_the_most_sensitive_columns(planned):
    model, hdiag = planned
    split = [lin for lin in find_linears(model.graph) if "lowbit.bits_split" in lin.node.metadata_props]
    assert split, "the case must split some layer"
    for lin in split:
        cols = np.asarray(json.loads(lin.node.metadata_props["lowbit.bits_split"])["columns"])
        dw = _rtn_error(lin.weight.const_value.numpy())
        sens = (hdiag[lin.name][:, None] * dw * dw).sum(0)
        n = sens.size
        assert cols.size == round(SPLIT * n)
        top = set(np.argsort(-sens, kind="stable")[: cols.size])
        overlap = len(top & set(cols.tolist())) / cols.size
        assert overlap >= 0.9, f"{lin.name}: only {overlap:.0%} of the split columns are the most sensitive"
        rest = np.setdiff1d(np.arange(n), cols)
        assert sens[cols].min() >= np.median(sens[rest])
