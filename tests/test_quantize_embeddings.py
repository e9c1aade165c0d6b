"""quantize-embeddings: int8 rows with one scale per row, against numpy."""

from __future__ import annotations

import numpy as np

import lowbit
from lowbit.ir.sessions import make_session


def quantize_rows_int8(table):
    """E[i] ≈ s[i]·Eq[i], s[i] = max|E[i]| / 127 (1 for an all-zero row), written from the formula."""
    amax = np.abs(table).max(axis=1).astype(np.float32)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(table / s[:, None]), -127, 127).astype(np.int8), s


def test_embedding_rows_match_numpy_and_shrink_the_model(stories_model):
    table = stories_model.graph.initializers["embed.weight"].const_value.numpy().copy()
    result = lowbit.compile(stories_model, "quantize-embeddings", progress=False)
    assert result.report["passes"][0]["stats"] == {"tables": 1}
    assert result.report["weight_bytes"] < result.report["float_weight_bytes"] - 0.7 * table.nbytes
    # the embedding output, exposed as a graph output of a one-node probe, equals numpy's dequantization
    eq, s = quantize_rows_int8(table)
    ids = np.array([[1, 403, 7, 511]], np.int64)
    model = result.model
    emb = next(n for n in model.graph if n.name.endswith("dequant")).outputs[0]
    model.graph.outputs.append(emb)
    got = make_session(model).run([emb.name], {"tokens": ids})[0]
    np.testing.assert_allclose(got, eq[ids].astype(np.float32) * s[ids][..., None], rtol=1e-7)


def test_small_tables_stay_float(stories_model):
    result = lowbit.compile(stories_model, "quantize-embeddings{min_rows=1000}", progress=False)
    assert result.report["passes"][0]["stats"] == {"small_tables": 1}
