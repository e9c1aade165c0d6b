"""Calibration statistics against numpy on the same activations; bad calibration data."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.quant.stats import check_feeds, collect_stats
from lowbit.errors import CalibrationError
from lowbit.ir.sessions import make_session, to_proto


def test_per_channel_stats_and_hessian_match_numpy(stories_model, stories_calibration):
    feeds = stories_calibration[:4]
    lin = find_linears(stories_model.graph)[0]
    stats = collect_stats(stories_model, [lin.input], feeds, hessian=True, rows=64, progress=False)[lin.input]
    proto = to_proto(stories_model)
    proto.graph.output.add(name=lin.input.name)
    sess = make_session(proto, optimize=False)
    xs = np.concatenate([sess.run([lin.input.name], f)[0].reshape(-1, 64) for f in feeds])
    np.testing.assert_array_equal(stats.cmax, xs.max(axis=0))
    np.testing.assert_array_equal(stats.cmin, xs.min(axis=0))
    np.testing.assert_allclose(stats.xtx, xs.astype(np.float64).T @ xs.astype(np.float64), rtol=1e-10)
    assert stats.count == xs.shape[0] and stats.rows.shape == (64, 64)


def test_infinities_are_ignored():
    from lowbit.quant.stats import ActStats

    st = ActStats(np.full(3, np.inf, np.float32), np.full(3, -np.inf, np.float32))
    st.update(np.array([[1.0, -np.inf, 2.0], [-3.0, 5.0, np.inf]], np.float32), hessian=False, sample=True)
    np.testing.assert_array_equal(st.cmin, [-3, 5, 2])
    np.testing.assert_array_equal(st.cmax, [1, 5, 2])
    assert np.all(np.isfinite(st.sample))


@pytest.mark.parametrize("feed, message", [
    ({"token": np.zeros((1, 4), np.int64)}, "missing \\['tokens'\\]"),
    ({"tokens": np.zeros((1, 4), np.int32)}, "dtype int32"),
    ({"tokens": np.zeros((4,), np.int64)}, "rank 1"),
    ({"tokens": np.zeros((1, 0), np.int64)}, "empty"),
])
def test_calibration_inputs_that_do_not_fit_are_refused(stories_model, feed, message):
    with pytest.raises(CalibrationError, match=message):
        check_feeds(stories_model, [feed])
    with pytest.raises(CalibrationError, match="no calibration samples"):
        check_feeds(stories_model, [])


@pytest.mark.parametrize("past_dim, ok", [("p", True), ("3", False)])
def test_an_empty_kv_past_is_a_prefill_only_on_a_symbolic_dim(past_dim, ok):
    """A decoder's prefill feeds its KV past with length 0 on the symbolic past axis: a valid sample.  A zero
    length on a dimension the model fixes is an empty input and is refused (the past, or any float rank ≥ 3)."""
    from onnx_text import parse

    model = parse(f"""
    g (int64[b, t] tokens, float[b, 2, {past_dim}, 4] past_key) => (float[b, 2, n, 4] y)
    {{
        y = Identity (past_key)
    }}""")
    feed = {"tokens": np.zeros((1, 4), np.int64), "past_key": np.zeros((1, 2, 0, 4), np.float32)}
    if ok:
        check_feeds(model, [feed])
    else:
        with pytest.raises(CalibrationError, match="'past_key' is empty"):
            check_feeds(model, [feed])


def test_calibration_extent_counts_sequences_and_unpadded_tokens_of_list_or_array_feeds(stories_model):
    """Samples as given (arrays or nested lists, as a JSON calibration file holds them): sequences are the rows of
    the token input, tokens the unpadded ones (the attention mask's sum) — counted here by hand."""
    from lowbit.passes.calibrate import calibration_extent

    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    want = {"samples": 3, "sequences": 2 + 2 + 1, "tokens": 5 + 8 + 3}
    for cast in (list, np.asarray):
        feeds = [{"tokens": cast(ids), "attention_mask": cast(mask)}, {"tokens": cast(ids)}, {"tokens": cast([9, 9, 9])}]
        assert calibration_extent(stories_model, feeds) == want
