"""assign-bits: the integer program's optimum, budgets held exactly, annotations, plan save/edit/replay."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lowbit.ir.analysis import find_linears
from lowbit.mixed.bitplan import Option, Plan, Unit, fake_quant_proto, plan_bytes, solve
from lowbit.errors import LowbitError, PassFailure, PipelineError
from lowbit.mixed.latency import LatencyTable
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.rtn import storage_bytes
from lowbit_models import SMALL_LLAMA, calibrated_small_llama

CFG = SMALL_LLAMA
_calibrated = calibrated_small_llama


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated()


def run(model, ctx, pipeline):
    ctx.report.clear()
    PassManager.from_pipeline(pipeline, ctx).run(model)
    return Plan.from_dict(ctx.report["assign-bits"]["plan"])


def test_solver_upgrades_the_sensitive_layer_when_only_one_upgrade_fits():
    units = [Unit(name, (64, 64), None, [Option(2, 0, 100, cost), Option(4, 0, 200, cost / 10)])
             for name, cost in (("quiet", 1.0), ("loud", 50.0), ("mild", 3.0))]
    chosen = solve(units, capacity=400)
    assert [o.bits for o in chosen] == [2, 4, 2]
    assert [o.bits for o in solve(units, capacity=500)] == [2, 4, 4]
    with pytest.raises(LowbitError, match="below the smallest"):
        solve(units, capacity=299)


def test_solver_finds_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    units = [Unit(f"l{i}", (1, 1), None, [Option(b, 0, int(rng.integers(1, 50)) * b, float(rng.random()) / b)
                                         for b in (2, 3, 4, 8)]) for i in range(6)]
    cap = 300
    best = min((c for c in itertools.product(*(u.options for u in units)) if sum(o.bytes for o in c) <= cap),
               key=lambda c: sum(o.cost for o in c))
    chosen = solve(units, cap)
    assert sum(o.bytes for o in chosen) <= cap
    assert sum(o.cost for o in chosen) == pytest.approx(sum(o.cost for o in best), rel=1e-9)


@pytest.mark.parametrize("target", [2.75, 3.0, 3.5, 4.25])
def test_average_bits_budget_is_respected_exactly(calibrated, target):
    model, ctx = calibrated
    plan = run(model, ctx, f"assign-bits{{target={target}}}")
    lins = find_linears(model.graph)
    assert plan.weights == sum(lin.shape[0] * lin.shape[1] for lin in lins)
    assert 8 * plan.linear_bytes <= target * plan.weights
    weights = {lin.name: lin.weight.const_value.numpy() for lin in lins}
    assert plan_bytes(plan, weights) == plan.linear_bytes  # the count is the packed buffers' size
    for lin in lins:  # annotations only: weights untouched, metadata on the MatMul
        lp = plan.layer(lin.name)
        assert lin.node.metadata_props["lowbit.bits"] == str(lp.bits)
        assert lin.node.metadata_props["lowbit.group"] == str(lp.group)
        assert lin.weight.const_value.dtype.name == "FLOAT"


def test_bytes_budget_counts_the_whole_model_and_beats_uniform(calibrated):
    model, ctx = calibrated
    lins = find_linears(model.graph)
    names = {lin.weight.name for lin in lins}
    fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n not in names)
    from lowbit.mixed.bitplan import FORM_BYTES, function_bytes, graph_overhead

    # the written file's non-initializer bytes: the graph, each quantized linear's form, MatMul3Bit's body
    graph = graph_overhead(model) + FORM_BYTES * len(lins) + function_bytes("MatMul3Bit")
    uniform3 = fixed + graph + sum(storage_bytes(*lin.shape, 3, 32 if lin.shape[0] > 32 else 0) for lin in lins)
    plan = run(model, ctx, f"assign-bits{{budget=bytes,target={uniform3},groups=32}}")
    assert plan.fixed_bytes == fixed
    assert plan.graph_bytes == graph - (function_bytes("MatMul3Bit") if all(lp.bits != 3 for lp in plan.layers) else 0)
    assert plan.file_bytes <= uniform3
    uni_cost = sum(
        __import__("lowbit.mixed.sensitivity", fromlist=["x"]).cheap_sensitivity(lin, 3, 32 if lin.shape[0] > 32 else 0)
        for lin in lins)
    assert sum(lp.est_error for lp in plan.layers) <= uni_cost + 1e-12  # uniform is feasible: the optimum is no worse


def test_latency_budget(calibrated):
    model, ctx = calibrated
    table = LatencyTable.load("ort-cpu")
    lins = find_linears(model.graph)
    all4 = sum(table.us(*lin.shape, 4) for lin in lins)
    plan = run(model, ctx, f"assign-bits{{budget=latency,target={all4}}}")
    spent = sum(table.us(*lp.shape, lp.bits) for lp in plan.layers)
    assert spent <= all4 + 1e-9 and plan.extra["latency_us"] == pytest.approx(spent, abs=0.01)


def test_split_columns_are_annotated_and_counted(calibrated):
    model, ctx = calibrated
    plan = run(model, ctx, "assign-bits{target=3.5,split=0.25,groups=32}")
    split = [lp for lp in plan.layers if lp.split]
    assert split, "with a quarter of the columns free to differ, some layer should split"
    assert 8 * plan.linear_bytes <= 3.5 * plan.weights
    lins = {lin.name: lin for lin in find_linears(model.graph)}
    for lp in split:
        k, n = lp.shape
        ann = json.loads(lins[lp.name].node.metadata_props["lowbit.bits_split"])
        assert ann["columns"] == lp.split["columns"] and len(ann["columns"]) == round(0.25 * n)
        assert lp.bytes + lp.split["bytes"] == (storage_bytes(k, n - len(ann["columns"]), lp.bits, lp.group)
                                                + storage_bytes(k, len(ann["columns"]), ann["bits"], ann["group"])
                                                + 4 * n)  # the int32 column order
        assert ann["bits"] > lp.bits or (ann["bits"] == lp.bits and 0 < ann["group"] < (lp.group or 1 << 30))
    weights = {n: lin.weight.const_value.numpy() for n, lin in lins.items()}
    assert plan_bytes(plan, weights) == plan.linear_bytes


def test_plan_save_edit_replay(calibrated, tmp_path):
    model, ctx = calibrated
    path = tmp_path / "plan.json"
    plan = run(model, ctx, f"assign-bits{{target=3.0,save={path}}}")
    data = json.loads(path.read_text())
    edited = data["layers"][0]["name"]
    data["layers"][0]["bits"] = 8  # a hand edit; the stale byte count must be recomputed
    data["layers"][0]["group"] = 0
    path.write_text(json.dumps(data))
    replayed = run(model, ctx, f"assign-bits{{plan={path}}}")
    lins = {lin.name: lin for lin in find_linears(model.graph)}
    assert lins[edited].node.metadata_props["lowbit.bits"] == "8"
    assert replayed.layer(edited).bytes == storage_bytes(*lins[edited].shape, 8, 0)
    for lp in replayed.layers[1:]:
        assert (lp.bits, lp.group, lp.bytes) == (plan.layer(lp.name).bits, plan.layer(lp.name).group,
                                                 plan.layer(lp.name).bytes)
        assert lins[lp.name].node.metadata_props["lowbit.bits"] == str(lp.bits)
    assert Plan.load(path).layers[0].bits == 8


def test_replay_refuses_a_plan_for_another_model(calibrated, tmp_path):
    model, ctx = calibrated
    path = tmp_path / "plan.json"
    run(model, ctx, f"assign-bits{{target=3.0,save={path}}}")
    data = json.loads(path.read_text())
    data["layers"][0]["shape"] = [7, 7]
    path.write_text(json.dumps(data))
    with pytest.raises(PassFailure, match="shape"):
        run(model, ctx, f"assign-bits{{plan={path}}}")
    data["layers"] = data["layers"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(PassFailure, match="no entry"):
        run(model, ctx, f"assign-bits{{plan={path}}}")
    run(model, ctx, f"assign-bits{{target=3.0,save={path}}}")
    data = json.loads(path.read_text())
    data["layers"].append(dict(data["layers"][0], name="not.a.layer"))
    path.write_text(json.dumps(data))
    with pytest.raises(PassFailure, match="'not.a.layer' is not a linear of this model"):
        run(model, ctx, f"assign-bits{{plan={path}}}")


def test_options_validate_themselves():
    for bad in ("bits=5", "groups=48", "split=1.5", "target=0"):
        with pytest.raises(PipelineError):
            PassManager.from_pipeline(f"assign-bits{{{bad}}}", CompileContext())


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5])
def test_nominal_bits_budget(calibrated, target):
    model, ctx = calibrated
    plan = run(model, ctx, f"assign-bits{{budget=nominal_bits,target={target},split=0.125}}")
    total = sum(lp.shape[0] * (lp.shape[1] - (len(lp.split["columns"]) if lp.split else 0)) * lp.bits
                + (lp.shape[0] * len(lp.split["columns"]) * lp.split["bits"] if lp.split else 0) for lp in plan.layers)
    assert total <= target * plan.weights and plan.nominal_bits == pytest.approx(total / plan.weights)
    assert total > (target - 1) * plan.weights  # the budget is used, not wasted
    # scales are free under this budget, so the finest group wins wherever it differs from per-channel
    assert all(lp.group in (0, 32) for lp in plan.layers)


def _write_matmulnbits(model, plan, path):
    """Test-only materialiser for plans of 2/4/8 bits: MatMulNBits nodes fed by ``pack``'s arrays."""
    import onnx
    from onnx import helper, numpy_helper

    from lowbit.quant.rtn import blocks, pack
    from lowbit.ir.sessions import to_proto

    proto = to_proto(model)
    lins = {lin.node.name: lin for lin in find_linears(model.graph)}
    drop = set()
    for node in proto.graph.node:
        lin = lins.get(node.name)
        if lin is None:
            continue
        lp = plan.layer(lin.name)
        k, n = lin.shape
        arrays = pack(lin.weight.const_value.numpy(), lp.bits, lp.group)
        names = [f"{lin.name}.{key}" for key in arrays]
        proto.graph.initializer.extend(numpy_helper.from_array(a, nm) for a, nm in zip(arrays.values(), names))
        drop.add(lin.weight.name)
        new = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), name=node.name,
                               domain="com.microsoft", K=k, N=n, bits=lp.bits, block_size=blocks(k, lp.group)[0],
                               accuracy_level=0)
        node.CopyFrom(new)
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(proto, str(path))
    return path


def test_written_file_holds_exactly_the_planned_bytes_and_computes_the_fake_quant(calibrated, tmp_path):
    import onnx
    from onnx import numpy_helper

    from lowbit.ir.sessions import make_session

    model, ctx = calibrated
    for target in (3.25, 4.0):
        plan = run(model, ctx, f"assign-bits{{target={target},bits=2:4:8}}")
        assert {lp.bits for lp in plan.layers} <= {2, 4, 8} and 8 * plan.linear_bytes <= target * plan.weights
        path = _write_matmulnbits(model, plan, tmp_path / f"m{target}.onnx")
        written = onnx.load(str(path))
        assert sum(numpy_helper.to_array(t).nbytes for t in written.graph.initializer) == plan.total_bytes
        # the fake-quant model (what the benchmark evaluates) equals the real MatMulNBits kernels
        fake = fake_quant_proto(model, plan)
        feed = {"tokens": np.arange(12, dtype=np.int64)[None] % CFG.vocab_size}
        real = make_session(path, matmulnbits_accuracy_level=0).run(None, feed)[0]
        np.testing.assert_allclose(real, make_session(fake).run(None, feed)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", ["target=3.6,bits=2:4:8", "target=3.5,bits=2:3:4:8"])
def test_split_plan_is_materialised_as_two_kernels_with_the_planned_bytes_and_values(options, tmp_path):
    """quantize-weights splits annotated layers; lower-nbits runs both parts as MatMulNBits; the
    written file holds exactly the planned bytes and computes the plan's fake-quantized weights."""
    import onnx
    from onnx import numpy_helper

    from lowbit.ir.model_io import save_onnx
    from lowbit.ir.sessions import make_session

    model, ctx = _calibrated()  # this test rewrites the model
    plan = run(model, ctx, f"assign-bits{{{options},split=0.25,groups=32}}")
    split = [lp for lp in plan.layers if lp.split]
    assert split and ("bits=2:3" not in options or any(lp.bits == 3 for lp in plan.layers))
    lins = find_linears(model.graph)
    fake = fake_quant_proto(model, plan)
    PassManager.from_pipeline("quantize-weights{symmetric=false},lower-nbits{accuracy_level=0}", ctx).run(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") + ops.count("MatMul3Bit") == len(lins) + len(split)
    assert ops.count("MatMul3Bit") == sum(lp.bits == 3 for lp in plan.layers) + sum(
        lp.split["bits"] == 3 for lp in split) and ops.count("Gather") >= len(split)
    assert "MatMul" not in ops or all(n.inputs[1].const_value is None for n in model.graph if n.op_type == "MatMul")
    path = tmp_path / "split.onnx"
    save_onnx(model, path)
    written = onnx.load(str(path))
    assert sum(numpy_helper.to_array(t).nbytes for t in written.graph.initializer) == plan.total_bytes
    size = path.stat().st_size  # a split layer's second kernel, Concat and column order are in the graph bytes
    assert abs(size - plan.file_bytes) <= 0.01 * size, (size, plan.file_bytes)
    feed = {"tokens": np.arange(12, dtype=np.int64)[None] % CFG.vocab_size}
    real = make_session(path, matmulnbits_accuracy_level=0).run(None, feed)[0]
    np.testing.assert_allclose(real, make_session(fake).run(None, feed)[0], rtol=1e-4, atol=1e-4)


def test_bad_split_annotation_is_refused_naming_the_layer():
    model, ctx = _calibrated()
    lin = find_linears(model.graph)[0]
    lin.node.metadata_props["lowbit.bits"] = "4"
    lin.node.metadata_props["lowbit.bits_split"] = json.dumps({"columns": [0, 0], "bits": 8, "group": 32})
    with pytest.raises(PassFailure, match=lin.name):
        PassManager.from_pipeline("quantize-weights", ctx).run(model)


MIXED_PIPELINE = ("calibrate{hessian=true},assign-bits{budget=nominal_bits,target=3.5,estimator=measured-kl,groups=64,"
                  "quantizer=gptq},quantize-weights{method=gptq,symmetric=false},lower-nbits")


def test_mixed_pipeline_compiles_end_to_end_to_the_planned_bytes(tmp_path):
    import onnx
    from onnx import numpy_helper

    import lowbit
    from lowbit.ir.sessions import make_session

    model, ctx = calibrated_small_llama()
    out = tmp_path / "mixed.onnx"
    result = lowbit.compile(model, MIXED_PIPELINE, calibration=ctx.calibration, output=out, progress=False)
    plan = Plan.from_dict(result.report["assign-bits"]["plan"])
    assert plan.nominal_bits <= 3.5 and {lp.group for lp in plan.layers} <= {0, 64}
    written = onnx.load(str(out))
    ops = [n.op_type for n in written.graph.node]
    inits = {t.name for t in written.graph.initializer}
    assert ops.count("MatMulNBits") + ops.count("MatMul3Bit") == len(plan.layers)
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in written.graph.node)  # no float linear left
    assert sum(numpy_helper.to_array(t).nbytes for t in written.graph.initializer) == plan.total_bytes
    logits = make_session(out).run(None, {"tokens": np.arange(8, dtype=np.int64)[None] % CFG.vocab_size})[0]
    assert np.isfinite(logits).all()


def test_the_default_budget_is_an_average_of_three_stored_bits(calibrated):
    """The documented default (``avg_bits``, target 3.0): the plan fits 3 bits per weight and uses it."""
    model, ctx = calibrated
    plan = run(model, ctx, "assign-bits")
    assert plan.budget == "avg_bits" and plan.target == 3.0
    assert 2.8 * plan.weights < 8 * plan.linear_bytes <= 3.0 * plan.weights


@pytest.mark.parametrize("bits", ["2:4:8", "3:4:8"])
def test_bytes_budget_predicts_the_written_file(bits, tmp_path):
    """budget=bytes counts the whole .onnx file: initializers exactly, the serialized graph within 1 %."""
    import os

    import lowbit

    model, ctx = calibrated_small_llama()
    lins = find_linears(model.graph)
    names = {lin.weight.name for lin in lins}
    fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n not in names)
    from lowbit.mixed.bitplan import FORM_BYTES, graph_overhead

    target = (fixed + graph_overhead(model) + FORM_BYTES * len(lins) + 2_000
              + sum(storage_bytes(*lin.shape, 3, 32 if lin.shape[0] > 32 else 0) for lin in lins))
    out = tmp_path / "mixed.onnx"
    pipe = (f"calibrate{{hessian=true}},assign-bits{{budget=bytes,target={target},bits={bits},groups=32}},"
            "quantize-weights{symmetric=false},lower-nbits")
    result = lowbit.compile(model, pipe, calibration=ctx.calibration, output=out, progress=False)
    plan = Plan.from_dict(result.report["assign-bits"]["plan"])
    import onnx

    written = onnx.load(str(out))
    assert sum(len(t.raw_data) for t in written.graph.initializer) == plan.total_bytes  # data: exact
    size = os.path.getsize(out)
    assert abs(size - plan.file_bytes) <= 0.01 * size  # graph: measured + FORM_BYTES per quantized linear
    assert plan.file_bytes <= target and size <= 1.01 * target


MOD_QW = "quantize-weights{method=gptq,symmetric=false,clip_search=true,dtype=mod,hessian_fit=true,scale_dtype=uint8}"


def test_gptq_mod_plans_count_the_grid_form_and_probe_the_weights_that_get_written():
    """quantizer=gptq-mod: 2/3-bit options are BitMoD grids (groups of 8 allowed only there) stored with uint8
    scales; each option's bytes are what quantize-weights writes, and the probes' weights are the written ones."""
    import onnx_ir as ir

    from lowbit.ir.sessions import make_session
    from lowbit.mixed.sensitivity import simulated_weight

    model, ctx = _calibrated()
    plan = run(model, ctx, "assign-bits{target=3.3,estimator=measured,bits=2:3:4,groups=8:32,quantizer=gptq-mod,"
                           "scale_dtype=uint8,samples=2}")
    assert 8 * plan.linear_bytes <= 3.3 * plan.weights
    assert all(lp.group != 8 or lp.bits in (2, 3) for lp in plan.layers) and {lp.bits for lp in plan.layers} > {2}
    lins = {lin.name: lin for lin in find_linears(model.graph)}
    fake = {lp.name: simulated_weight(lins[lp.name], lp.bits, lp.group, "gptq-mod:uint8") for lp in plan.layers}
    ref = _calibrated()[0]
    for lin in find_linears(ref.graph):
        lin.weight.const_value = ir.tensor(fake[lin.name])
    before = set(model.graph.initializers)
    PassManager.from_pipeline(MOD_QW, ctx).run(model)
    written = sum(v.const_value.nbytes for n, v in model.graph.initializers.items()
                  if n not in before and not n.startswith("lowbit.mod_grid"))
    assert written == plan.linear_bytes
    replayed = Plan.from_dict(plan.to_dict())
    replayed.refresh_bytes()  # a replayed plan counts its grid-form layers the same way
    assert replayed.linear_bytes == plan.linear_bytes
    feed = {"tokens": np.arange(12, dtype=np.int64)[None] % CFG.vocab_size}
    got = make_session(model).run(None, feed)[0]
    np.testing.assert_allclose(got, make_session(ref).run(None, feed)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineError, match="groups must be"):
        PassManager.from_pipeline("assign-bits{groups=8}", ctx)


def test_gptq_mod_bytes_budget_predicts_the_written_file(tmp_path):
    """budget=bytes with grid-form options: initializers exactly, the serialized graph within 1 %."""
    import os

    import onnx

    import lowbit

    model, ctx = calibrated_small_llama()
    lins = find_linears(model.graph)
    names = {lin.weight.name for lin in lins}
    fixed = sum(v.const_value.nbytes for n, v in model.graph.initializers.items() if n not in names)
    from lowbit.mixed.bitplan import graph_overhead
    from lowbit.quant.mod import mod_storage_bytes

    target = (fixed + graph_overhead(model) + 960 * len(lins) + 3_000
              + sum(mod_storage_bytes(*lin.shape, 3, 16, scale_dtype="uint8") for lin in lins))
    out = tmp_path / "mixed.onnx"
    pipe = (f"calibrate{{hessian=true}},assign-bits{{budget=bytes,target={target},bits=2:3:4,groups=8:16:32,"
            f"quantizer=gptq-mod,scale_dtype=uint8}},{MOD_QW},lower-nbits")
    result = lowbit.compile(model, pipe, calibration=ctx.calibration, output=out, progress=False)
    plan = Plan.from_dict(result.report["assign-bits"]["plan"])
    written = onnx.load(str(out))
    assert {lp.bits for lp in plan.layers} & {2, 3} and any(n.op_type == "MatMulGrid" for n in written.graph.node)
    data = sum(len(t.raw_data) for t in written.graph.initializer if not t.name.startswith("lowbit.mod_grid"))
    assert data == plan.total_bytes  # data: exact
    size = os.path.getsize(out)
    assert abs(size - plan.file_bytes) <= 0.01 * size
    assert plan.file_bytes <= target and size <= 1.01 * target


A_US, C_US = 0.5, {4: 1e-3, 8: 4e-3}  # a latency table us = a + c_b·K·N, written here


def test_split_layers_under_a_latency_budget_are_priced_as_two_kernels(calibrated, tmp_path):
    """A split layer runs two kernels: the rest at ``[K, N − n_s]`` and the salient columns at ``[K, n_s]``, each
    with its fixed cost.  On a table made for it (the 8-bit kernel 4× the 4-bit one per weight, so that a quarter of
    the columns at 8 bits fits where a whole 8-bit layer does not) the plan splits, its ``latency_us`` is the sum
    priced from the table's formula, written here, and within the target; a split layer has no measured error
    under the cheap estimator."""
    model, ctx = calibrated
    entries = [{"k": k, "n": n, "bits": b, "us": A_US + C_US[b] * k * n} for b in (4, 8)
               for k, n in ((64, 64), (64, 96), (96, 64), (128, 256))]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"backend": "test", "m": 1, "entries": entries}))
    lins = find_linears(model.graph)
    price = lambda k, n, b: A_US + C_US[b] * k * n if n else 0.0  # noqa: E731
    all4 = sum(price(*lin.shape, 4) for lin in lins)
    extra = sum(A_US + (C_US[8] - C_US[4]) * lin.shape[0] * round(0.25 * lin.shape[1]) for lin in lins)
    target = all4 + 0.5 * extra
    plan = run(model, ctx, f"assign-bits{{budget=latency,table={path},target={target},split=0.25,bits=4:8,groups=32}}")
    split = [lp for lp in plan.layers if lp.split]
    assert split, "the table makes a split the cheapest upgrade: some layer must split"
    spent = 0.0
    for lp in plan.layers:
        k, n = lp.shape
        ns = len(lp.split["columns"]) if lp.split else 0
        spent += price(k, n - ns, lp.bits) + (price(k, ns, lp.split["bits"]) if lp.split else 0.0)
        assert lp.measured_error is None, f"{lp.name}: the cheap estimator measured nothing"
    assert spent <= target + 1e-9
    assert plan.extra["latency_us"] == pytest.approx(spent, abs=0.01)


def test_a_split_of_one_column_is_a_split(calibrated):
    """``split=f`` gives every layer round(f·N) salient columns, one included (MixLLM's smallest split): with
    f = 0.02 the layers of N ≤ 74 split off a single column; the nominal budget (no column-order bytes) holds."""
    model, ctx = calibrated
    plan = run(model, ctx, "assign-bits{budget=nominal_bits,target=3.02,split=0.02}")
    split = [lp for lp in plan.layers if lp.split]
    assert any(len(lp.split["columns"]) == 1 for lp in split), "single-column splits must be possible"
    for lp in split:
        assert len(lp.split["columns"]) == round(0.02 * lp.shape[1])
    total = sum(lp.shape[0] * (lp.shape[1] - (len(lp.split["columns"]) if lp.split else 0)) * lp.bits
                + (lp.shape[0] * len(lp.split["columns"]) * lp.split["bits"] if lp.split else 0) for lp in plan.layers)
    assert total <= 3.02 * plan.weights
