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
