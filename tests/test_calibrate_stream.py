"""calibrate{stream=N}: causal-LM calibration re-cut as N-token windows of the samples' token stream."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.errors import CalibrationError, PipelineError
from lowbit.ir.analysis import find_linears
from lowbit.ir.sessions import make_session, to_proto
from lowbit.passes.calibrate import stream_windows
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.stats import META_KEY


def _numpy_windows(feeds, n):
    stream = np.concatenate([f["tokens"].ravel() for f in feeds])
    return [stream[i:i + n] for i in range(0, stream.size, n)]


def test_windows_are_the_stream_cut_every_n_tokens(stories_model, stories_calibration):
    feeds = stories_calibration[:6]
    got = stream_windows(stories_model, feeds, 50)
    want = _numpy_windows(feeds, 50)
    assert len(got) == len(want) > len(feeds)  # 16 stories of ≤ 128 tokens: more windows than stories
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["tokens"], w[None])
    assert sum(g["tokens"].size for g in got) == sum(f["tokens"].size for f in feeds)
    assert any(g["tokens"][0, 0] != feeds[0]["tokens"][0, 0] for g in got[1:])  # windows start mid-story


def test_windows_are_never_longer_than_the_longest_sample(stories_model, stories_calibration):
    feeds = [{"tokens": f["tokens"][:, :12]} for f in stories_calibration[:6]]  # short prompts
    got = stream_windows(stories_model, feeds, 256)
    want = _numpy_windows(feeds, 12)  # cut at the longest sample (12), not at 256 nor the context
    assert len(got) == len(want) == len(feeds)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["tokens"], w[None])


def test_calibrate_stream_ranges_are_those_of_the_windows(stories_model, stories_calibration):
    feeds = stories_calibration[:6]
    lin = find_linears(stories_model.graph)[3]
    proto = to_proto(stories_model)
    proto.graph.output.add(name=lin.input.name)
    sess = make_session(proto, optimize=False)
    outs = [sess.run([lin.input.name], {"tokens": w[None]})[0] for w in _numpy_windows(feeds, 40)]
    xs = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])
    ctx = CompileContext(calibration=feeds, show_progress=False)
    model = PassManager.from_pipeline("calibrate{stream=40}", ctx).run(stories_model)
    value = next(v for v in (li.input for li in find_linears(model.graph)) if v.name == lin.input.name)
    np.testing.assert_array_equal(value.meta[META_KEY].cmax, xs.max(axis=0))
    np.testing.assert_array_equal(value.meta[META_KEY].cmin, xs.min(axis=0))
    assert ctx.report["calibration"]["tokens"] == xs.shape[0]


def test_stream_needs_token_ids(stories_model):
    with pytest.raises(CalibrationError, match="no token-id input"):
        stream_windows(stories_model, [{"input_ids_wrong": np.zeros((1, 4), np.int64)}], 8)
    with pytest.raises(PipelineError, match="stream must be >= 0"):
        PassManager.from_pipeline("calibrate{stream=-1}", CompileContext(calibration=[], show_progress=False))
