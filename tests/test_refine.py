"""assign-bits refine: trust-region program, dominance pruning, and refinement never worse than its starts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.mixed.bitplan import Option, Plan, Unit, solve
from lowbit.errors import PipelineError
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.mixed.refine import prune_dominated
from lowbit.quant.rtn import storage_bytes
from lowbit_models import calibrated_small_llama
from rtn_reference import rtn_reference



def test_trust_region_limits_the_changed_units_and_is_the_constrained_optimum():
    rng = np.random.default_rng(3)
    units = [Unit(f"l{i}", (1, 1), None, [Option(b, 0, int(rng.integers(1, 40)) * b, float(rng.normal()))
                                         for b in (2, 3, 4, 8)]) for i in range(6)]
    base = [1] * 6
    cap = sum(u.options[1].bytes for u in units) + 60
    for m in (0, 1, 2, 3):
        feasible = [c for c in itertools.product(*(range(4) for _ in units))
                    if sum(u.options[i].bytes for u, i in zip(units, c)) <= cap
                    and sum(i != b for i, b in zip(c, base)) <= m]
        best = min(sum(u.options[i].cost for u, i in zip(units, c)) for c in feasible)
        chosen = solve(units, cap, base=base, max_changes=m)
        assert sum(o is not u.options[1] for o, u in zip(chosen, units)) <= m
        assert sum(o.cost for o in chosen) == pytest.approx(best, abs=1e-9)


def test_prune_keeps_exactly_the_non_dominated_options_and_the_current_one():
    opts = [Option(2, 32, 10, 5.0), Option(3, 128, 12, 6.0), Option(3, 32, 14, 2.0), Option(4, 64, 14, 2.5),
            Option(8, 0, 30, 0.0), Option(8, 32, 40, 0.0)]
    kept = prune_dominated(opts, "bytes")
    assert [(o.bits, o.group) for o in kept] == [(2, 32), (3, 32), (8, 0)]
    assert (4, 64) in [(o.bits, o.group) for o in prune_dominated(opts, "bytes", keep=(4, 64))]


def _kl_per_token(model, over, feeds):
    """Mean over scored tokens of KL(p_float ‖ p_quantized) of the next-token distributions, written
    out: a copy of the model with the weights replaced, plain ORT sessions, log-softmax in float64."""
    import onnx

    from lowbit.ir.sessions import make_session, to_proto

    float_sess = make_session(to_proto(model))
    proto = to_proto(model)
    for t in proto.graph.initializer:
        if t.name in over:
            t.CopyFrom(onnx.numpy_helper.from_array(over[t.name].astype(np.float32), t.name))
    quant_sess = make_session(proto)

    def logp(sess, f):
        z = sess.run(None, f)[0][:, :-1].astype(np.float64)  # the last position has no next token
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    total = count = 0
    for f in feeds:
        p, q = logp(float_sess, f), logp(quant_sess, f)
        kl = (np.exp(p) * (p - q)).sum(-1)
        total, count = total + kl.sum(), count + kl.size
    return total / count


@pytest.fixture(scope="module")
def calibrated():
    return calibrated_small_llama()


def test_refined_plan_fits_and_its_reported_loss_is_the_models(calibrated, tmp_path):
    model, ctx = calibrated
    lins = find_linears(model.graph)
    names = {lin.weight.name for lin in lins}
    fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n not in names)
    from lowbit.mixed.bitplan import FORM_BYTES, function_bytes, graph_overhead

    graph = graph_overhead(model) + FORM_BYTES * len(lins) + function_bytes("MatMul3Bit")  # the file's graph part
    target = fixed + graph + sum(storage_bytes(*lin.shape, 3, 32) for lin in lins)  # uniform 3b g32 fits exactly
    ctx.report.clear()
    PassManager.from_pipeline(f"assign-bits{{budget=bytes,target={target},estimator=measured-kl,bits=2:3:4,"
                              f"refine=2,cache={tmp_path}}}", ctx).run(model)
    plan = Plan.from_dict(ctx.report["assign-bits"]["plan"])
    ref = plan.extra["refine"]
    assert plan.file_bytes <= target and ref["metric"] == "kl"
    starts = ref["steps"][0]["starts"]
    assert "uniform 3b g32" in starts and "ilp" in starts
    assert any("round" in s for s in ref["steps"]), "refinement re-solved at least once"
    current = min(starts.values())
    for step in (s for s in ref["steps"] if "round" in s):  # accepted steps lower the loss, refused ones don't
        assert (step["loss"] < current) == step["accepted"]
        current = min(current, step["loss"])
    assert ref["loss"] == pytest.approx(current, abs=1e-6)  # never worse than any start on the calibration loss
    # recompute the joint loss of the final plan independently
    over = {lin.weight.name: rtn_reference(lin.weight.const_value.numpy(), plan.layer(lin.name).bits,
                                           plan.layer(lin.name).group) for lin in lins}
    assert _kl_per_token(model, over, ctx.calibration) == pytest.approx(ref["loss"], rel=1e-4)
    for lin in lins:
        assert lin.node.metadata_props["lowbit.bits"] == str(plan.layer(lin.name).bits)


def test_refine_needs_whole_layers_and_calibration(calibrated):
    with pytest.raises(PipelineError, match="split=0"):
        PassManager.from_pipeline("assign-bits{refine=1,split=0.25}", CompileContext())
    model, _ = calibrated
    from lowbit.errors import PassFailure

    with pytest.raises(PassFailure, match="calibration"):
        PassManager.from_pipeline("assign-bits{refine=1}", CompileContext(calibration=[], properties={
            "calibrated", "calibrated-hessian"})).run(model)
