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
