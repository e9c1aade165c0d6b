"""Edges that mutation testing found unguarded: an option at its boundary, an op written with its
default attribute left out.  Expected values are written here (numpy, the ONNX spec's defaults)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit_models import random_llama, tokens
from onnx_text import parse, run


def test_a_transpose_without_perm_is_folded_like_perm_1_0():
    """ONNX: Transpose without ``perm`` reverses the axes, i.e. perm = [1, 0] for a matrix."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"""g (float[b, 3] x) => (float[b, 4] y) <float[4, 3] w = {{{vals}}}> {{
        wt = Transpose (w)
        y = MatMul (x, wt) }}""")
    out, pm = run(model, "canonicalize")
    assert [n.op_type for n in out.graph] == ["MatMul"]
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(make_session(out, optimize=False).run(None, {"x": x})[0], x @ w.T, rtol=1e-6)


def test_awq_grid_of_one_is_a_valid_search():
    """grid=1 searches α ∈ {1} (plus no scaling): the smallest grid the option allows; grid=0 is refused."""
    feeds = [tokens(128, batch=1, seq=16, seed=i) for i in range(2)]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    PassManager.from_pipeline("calibrate{rows=64},awq{bits=3,group=32,grid=1}", ctx).run(
        random_llama(dim=64, hidden=96, layers=1, heads=4, kv=2, vocab=128))
    with pytest.raises(Exception, match="grid"):
        PassManager.from_pipeline("awq{grid=0}", CompileContext(show_progress=False))


def test_integer_norms_refuses_a_shift_not_above_frac_bits():
    from lowbit.errors import LowbitError

    PassManager.from_pipeline("integer-norms{frac_bits=16,shift=17}", CompileContext(show_progress=False))
    with pytest.raises(LowbitError, match="shift"):
        PassManager.from_pipeline("integer-norms{frac_bits=16,shift=16}", CompileContext(show_progress=False))


def test_an_integer_norm_whose_output_leaves_the_integer_region():
    """A norm output that is also a graph output (float consumers: an 'exit') gets a DequantizeLinear at
    the norm's output step; before, only the slow MiniLM test reached that path."""
    import onnx
    import onnx_ir as ir

    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.runtime.reference import compare_graph_with_ort
    from lowbit_models import rel_err
    from test_integer_tiny import INTEGER, QDQ, _post_norm_encoder

    proto, calib, probe = _post_norm_encoder("Mul")
    proto.graph.output.append(onnx.helper.make_tensor_value_info("h1", onnx.TensorProto.FLOAT, None))
    qdq = PassManager.from_pipeline(QDQ, CompileContext(calibration=calib, show_progress=False)).run(
        ir.serde.deserialize_model(proto))
    ctx = CompileContext(calibration=calib, show_progress=False)
    integer = PassManager.from_pipeline(INTEGER, ctx).run(ir.serde.deserialize_model(proto))
    assert ctx.report["integer-norms"]["norms"] == 3 and ctx.report["integer-norms"]["exits"] == 1
    compared, mismatches = compare_graph_with_ort(integer, [probe])
    assert compared > 10 and not mismatches, mismatches
    LowerLowbit()(integer)
    got = make_session(integer, optimize=False).run(None, probe)
    want = make_session(qdq, optimize=False).run(None, probe)
    h1 = [o.name for o in integer.graph.outputs].index("h1")
    assert rel_err(got[h1], want[h1]) < 0.05 and rel_err(got[0], want[0]) < 0.12  # measured 0.029, 0.064


def test_statistics_rescaled_by_smoothing_equal_a_fresh_calibration():
    """smooth folds 1/s into the producer and rescales the stored statistics instead of re-running the
    model (w8a8: quantize reads them right after): per channel min, max and XᵀX must be what a fresh
    calibration of the smoothed model measures (x → x/s with s > 0 maps min to min/s)."""
    import onnx_ir as ir

    from lowbit.ir.analysis import find_groups
    from lowbit.quant.stats import act_stats

    feeds = [tokens(128, batch=1, seq=16, seed=i) for i in range(3)]
    ctx = CompileContext(calibration=feeds, show_progress=False)
    smoothed = PassManager.from_pipeline("calibrate{hessian=true},smooth{alpha=0.5}", ctx).run(
        random_llama(dim=64, hidden=96, layers=1, heads=4, kv=2, vocab=128))
    fresh = PassManager.from_pipeline("calibrate{hessian=true}", CompileContext(calibration=feeds, show_progress=False)
                                      ).run(ir.serde.deserialize_model(ir.serde.serialize_model(smoothed)))
    by_name = {g.activation.name: g.activation for g in find_groups(fresh.graph)}
    checked = 0
    for g in find_groups(smoothed.graph):
        kept, new = act_stats(g.activation), act_stats(by_name[g.activation.name])
        if kept is None or g.kind == "none":
            continue
        assert np.any(kept.cmin < 0) and np.any(kept.cmax > 0)
        np.testing.assert_allclose(kept.cmin, new.cmin, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(kept.cmax, new.cmax, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(kept.xtx, new.xtx, rtol=1e-3, atol=1e-6 * np.abs(new.xtx).max())
        checked += 1
    assert checked >= 3
