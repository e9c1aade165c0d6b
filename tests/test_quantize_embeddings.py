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


def _gather(axis_attr: str, rows: int = 300, cols: int = 4) -> str:
    table = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
    lit = ", ".join(f"{v:.9g}" for v in table.reshape(-1))
    out = "[b, t, 4]" if "1" not in axis_attr else "[300, b, t]"
    return table, f"""
    g (int64[b, t] ids) => (float{out} y)
    <float[{rows}, {cols}] e = {{{lit}}}>
    {{ y = Gather {axis_attr} (e, ids) }}"""


def test_an_explicit_axis_0_gather_is_quantized_and_axis_1_is_left_alone():
    """Gather's axis: ``axis = 0`` spelled out is the same row lookup as no attribute (rewritten, values equal the
    numpy per-row dequantization); ``axis = 1`` picks columns, which per-row scales cannot serve (left alone)."""
    from onnx_text import digest, ort_outputs, parse, run

    table, text = _gather("<axis = 0>")
    out, pm = run(parse(text), "quantize-embeddings")
    assert pm.passes[0].stats["tables"] == 1
    ids = np.array([[0, 299, 17, 17]], np.int64)
    eq, s = quantize_rows_int8(table)
    np.testing.assert_allclose(ort_outputs(out, {"ids": ids})[0], eq[ids].astype(np.float32) * s[ids][..., None],
                               rtol=1e-7)
    _, text = _gather("<axis = 1>")
    before = parse(text)
    want = digest(before)
    assert digest(run(before, "quantize-embeddings")[0]) == want
