"""True-sequential GPTQ: the incremental stage-by-stage calibration equals re-running the model
from scratch before every linear, with all earlier linears already quantized."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from lowbit.ir.analysis import find_linears
from lowbit.ir.sessions import make_session, to_proto
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.quant.gptq import dequantize, gptq_quantize
from lowbit_models import random_llama, rel_err

BITS, GROUP = 3, 16


def _feeds():
    rng = np.random.default_rng(5)
    return [{"tokens": rng.integers(0, 128, (1, int(n))).astype(np.int64)} for n in (9, 14, 20)]


def _from_scratch_reference(model, feeds):
    """Per linear in graph order: run the whole model (earlier linears at Ŵ) to get its input, then GPTQ."""
    for lin in find_linears(model.graph):
        proto = to_proto(model)
        proto.graph.output.append(onnx.helper.make_tensor_value_info(lin.input.name, onnx.TensorProto.FLOAT, None))
        sess = make_session(proto, optimize=False)
        xtx = 0
        for f in feeds:
            x = sess.run([lin.input.name], f)[0].reshape(-1, lin.shape[0]).astype(np.float64)
            xtx = xtx + x.T @ x
        w = lin.weight.const_value.numpy()
        w_hat = dequantize(*gptq_quantize(w, xtx, BITS, GROUP, True, False), GROUP)
        lin.weight.const_value = ir.tensor(w_hat.astype(np.float32), name=lin.weight.name)
    return model


def test_sequential_equals_from_scratch_and_differs_from_one_shot():
    feeds = _feeds()
    probe = {"tokens": np.random.default_rng(9).integers(0, 128, (2, 16)).astype(np.int64)}
    ctx = CompileContext(calibration=feeds, show_progress=False)
    seq = PassManager.from_pipeline(f"quantize-weights{{bits={BITS},group={GROUP},method=gptq,sequential=true}}",
                                    ctx).run(random_llama(dim=64, hidden=96, layers=2, heads=4, kv=2, vocab=128))
    one = PassManager.from_pipeline(f"calibrate{{hessian=true}},quantize-weights{{bits={BITS},group={GROUP},method=gptq}}",
                                    CompileContext(calibration=feeds, show_progress=False)).run(
        random_llama(dim=64, hidden=96, layers=2, heads=4, kv=2, vocab=128))
    ref = _from_scratch_reference(random_llama(dim=64, hidden=96, layers=2, heads=4, kv=2, vocab=128), feeds)
    got = make_session(seq, optimize=False).run(None, probe)[0]
    want = make_session(ref, optimize=False).run(None, probe)[0]
    other = make_session(one, optimize=False).run(None, probe)[0]
    assert rel_err(got, want) < 1e-5
    assert rel_err(other, want) > 1e-4  # one-shot Hessians give a different model: the test can tell


def test_stages_follow_linear_depth_and_every_node_runs_once(caplog):
    """linear_stages: q/k/v, then o, then gate/up, then down per block (then the head); the calibrator
    runs each node once over all stages (the frontier is cached, never recomputed from the inputs)."""
    import logging

    from lowbit.quant.sequential import SequentialCalibrator, linear_stages

    model = random_llama(dim=64, hidden=96, layers=2, heads=4, kv=2, vocab=128)
    linears = find_linears(model.graph)
    stages = linear_stages(model.graph, linears)
    kinds = [sorted(lin.name.rsplit(".", 1)[-1].split("_")[0] for lin in st) for st in stages]
    want = [["k", "q", "v"], ["o"], ["gate", "up"], ["down"]] * 2
    assert kinds[:8] == want, kinds
    assert len(stages) == 9 and len(stages[8]) == 1  # the head last, alone
    proto = to_proto(model)
    cal = SequentialCalibrator(proto, _feeds()[:1])
    with caplog.at_level(logging.DEBUG, logger="lowbit.quant.sequential"):
        for st in stages:
            xtx = cal.hessians(sorted({lin.input.name for lin in st}))
            assert all(v.shape == (lin.shape[0], lin.shape[0]) for lin, v in zip(st, xtx.values()))
    ran = sum(int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("stage:"))
    assert len(caplog.records) >= len(stages) and 0 < ran <= len(proto.graph.node)


def test_padding_rows_stay_out_of_the_sequential_hessians():
    """XᵀX of a linear after a quantized one, with an attention_mask: written here in numpy over the
    real tokens only (padded positions would pull the Hessian towards whatever the padding computes)."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.quant.sequential import SequentialCalibrator

    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 8]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 5])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    mask = np.ones((2, 7), np.int64)
    mask[0, 5:] = 0
    mask[1, :2] = 0  # right and left padding
    x = rng.standard_normal((2, 7, 8)).astype(np.float32) * 3
    cal = SequentialCalibrator(proto, [{"x": x, "attention_mask": mask}])
    keep = mask.reshape(-1) != 0
    x2 = x.reshape(-1, 8).astype(np.float64)[keep]
    np.testing.assert_allclose(cal.hessians(["x"])["x"], x2.T @ x2, rtol=1e-6)
    w1_hat = np.round(w1 * 4) / 4  # a "quantized" first linear
    cal.set_weight("w1", w1_hat)
    r = np.maximum(x2.astype(np.float32) @ w1_hat, 0).astype(np.float64)
    np.testing.assert_allclose(cal.hessians(["r"])["r"], r.T @ r, rtol=1e-5)


def test_sequential_after_rotate_reads_the_online_hadamard():
    """After rotate, down's input goes through lowbit.Hadamard, an ONNX function of the model: the
    stage models must carry the model's functions (w4a4 runs rotate, then sequential GPTQ)."""
    feeds = _feeds()
    probe = {"tokens": np.random.default_rng(9).integers(0, 128, (1, 16)).astype(np.int64)}

    def rotated():
        m = random_llama(dim=64, hidden=96, layers=1, heads=4, kv=2, vocab=128)
        return PassManager.from_pipeline("fold-norms,rotate", CompileContext(show_progress=False)).run(m)

    model = rotated()
    assert any(n.op_type == "Hadamard" for n in model.graph)
    seq = PassManager.from_pipeline(f"quantize-weights{{bits={BITS},group={GROUP},method=gptq,sequential=true}}",
                                    CompileContext(calibration=feeds, show_progress=False)).run(model)
    ref = _from_scratch_reference(rotated(), feeds)
    got = make_session(seq, optimize=False).run(None, probe)[0]
    want = make_session(ref, optimize=False).run(None, probe)[0]
    assert rel_err(got, want) < 1e-5
