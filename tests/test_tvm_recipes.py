"""TVM vs ONNX Runtime on lowbit's OWN compiled output of every recipe (not hand-built look-alikes).

A tiny random Llama (realistic structure: GQA, SwiGLU, RMSNorm, RoPE) is compiled with each
recipe through ``lowbit.compile`` (ORT backend, verify-each on), then the very same compiled model is
built with TVM and both runtimes run the same tokens: ``slow`` (one TVM build of a whole model per
recipe, over a minute on two busy cores).  The default suite builds lowbit's own output for ONE
linear with the w4a16 recipe's passes, symmetric (MatMulNBits without zero points: the case a
converter that assumed zero points got wrong) and asymmetric.
"""

from __future__ import annotations

import numpy as np
import pytest
from known_failures import mark_known

pytest.importorskip("tvm")

import lowbit  # noqa: E402
from lowbit.backends.tvm_lower import lower_tvm  # noqa: E402
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights  # noqa: E402
from lowbit.ir.sessions import make_session  # noqa: E402
from lowbit.passmanager.recipes import RECIPES  # noqa: E402
from lowbit.runtime.tvm_runner import TvmSession  # noqa: E402

CFG = LlamaConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, seq_len=32)
# ORT's MatMulNBits at accuracy_level 4 quantizes activations to int8 inside the kernel; TVM's
# lowering follows the same rule, but the int8 rounding can differ by one code at ties.
# lower-nbits runs 2- and 8-bit layers at level 4 (ORT's only fast kernel for them): the 8-bit heads of
# w4a16-gptq/w2a16/w3a16/mixed-w3a16 (the 2/3-bit linears of the last three are lowbit.MatMulGrid, folded
# exactly) and the mixed recipes' 2/8-bit layers quantize activations in ORT, not in TVM's TIR kernels.
TOLERANCE = {"w4a8": 2e-2, "w4a4": 2e-2, "w2a16": 2e-2, "w3a16": 2e-2, "mixed-w3a16": 2e-2, "mixed-w4a16": 2e-2,
             "w4a16-gptq": 2e-2}



def _calibration(n=4, seq=16):
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, CFG.vocab_size, (1, seq)).astype(np.int64)} for _ in range(n)]


def _model():
    w = random_llama_weights(CFG, seed=1)
    rng = np.random.default_rng(2)
    for k in ("attn_norm", "ffn_norm", "final_norm"):
        w[k] = (0.5 + rng.random(w[k].shape)).astype(np.float32)
    return build_llama(CFG, w)


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# Still failing (session 7): w4a4 (TVM differs from ORT by 0.3 relative: its int4 activation quantizers),
# the KV recipes (quantize-kv refuses this cache-less graph: the test would need the KV-cache form).
KNOWN_FAILING = {"w4a4", "w8a8-kv8", "w4a8-kv4", "w4a4-kv4"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", mark_known(list(RECIPES), KNOWN_FAILING))
def test_tvm_matches_ort_on_the_compiled_recipe(recipe, tmp_path):
    compiled = lowbit.compile(_model(), recipe, calibration=_calibration(), progress=False).model
    tok = np.random.default_rng(5).integers(0, CFG.vocab_size, (1, 9)).astype(np.int64)
    art = lower_tvm(compiled, "llvm", tmp_path, "m", shape_dict={"tokens": list(tok.shape)})
    got, = TvmSession(art.lib).run(None, {"tokens": tok})
    ref, = make_session(compiled).run(None, {"tokens": tok})
    assert got.shape == ref.shape
    assert _rel(got, ref) <= TOLERANCE.get(recipe, 1e-4), f"{recipe}: TVM differs from ORT by {_rel(got, ref):.3g}"


def test_w4a16_has_matmulnbits_without_zero_points():
    """The fast case above really is the one the issue names."""
    compiled = lowbit.compile(_model(), "w4a16", calibration=_calibration(), progress=False).model
    nbits = [n for n in compiled.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.inputs) < 4 or n.inputs[3] is None for n in nbits)


@pytest.mark.parametrize("symmetric", [True, False])
def test_tvm_matches_ort_on_lowbits_own_nbits_linear(symmetric, tmp_path):
    from lowbit.passmanager.manager import CompileContext, PassManager
    from onnx_text import parse

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((128, 48)) / 8).astype(np.float32)
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"g (float[4, 128] x) => (float[4, 48] y) <float[128, 48] w = {{{vals}}}> {{ y = MatMul (x, w) }}")
    pipeline = f"quantize-weights{{bits=4,group=32,symmetric={str(symmetric).lower()}}},lower-nbits"
    compiled = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False)).run(model)
    nbits = [n for n in compiled.graph if n.op_type == "MatMulNBits"]
    has_zp = [len(n.inputs) > 3 and n.inputs[3] is not None for n in nbits]
    assert nbits and has_zp == [not symmetric]
    x = rng.standard_normal((4, 128)).astype(np.float32)
    art = lower_tvm(compiled, "llvm", tmp_path, "m", shape_dict={"x": [4, 128]})
    got, = TvmSession(art.lib).run(None, {"x": x})
    ref, = make_session(compiled).run(None, {"x": x})
    assert _rel(got, ref) <= 1e-4


@pytest.mark.parametrize("bits,group,scale_dtype", [(2, 8, "uint8"), (3, 16, "uint8"), (3, 32, "float16")])
def test_tvm_matches_ort_on_a_grid_form_linear(bits, group, scale_dtype, tmp_path):
    """lowbit.MatMulGrid (w2a16/w3a16's form; uint8 scales through Cast·step) folds to the weight ORT computes."""
    from lowbit.passmanager.manager import CompileContext, PassManager
    from onnx_text import parse

    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((100, 24)) / 8).astype(np.float32)
    vals = ", ".join(f"{v:.9g}" for v in w.reshape(-1))
    model = parse(f"g (float[3, 100] x) => (float[3, 24] y) <float[100, 24] w = {{{vals}}}> {{ y = MatMul (x, w) }}")
    pipeline = f"quantize-weights{{bits={bits},group={group},dtype=mod,scale_dtype={scale_dtype}}}"
    compiled = PassManager.from_pipeline(pipeline, CompileContext(show_progress=False)).run(model)
    assert [n.op_type for n in compiled.graph if n.op_type == "MatMulGrid"] == ["MatMulGrid"]
    x = rng.standard_normal((3, 100)).astype(np.float32)
    art = lower_tvm(compiled, "llvm", tmp_path, "m", shape_dict={"x": [3, 100]})
    got, = TvmSession(art.lib).run(None, {"x": x})
    ref, = make_session(compiled).run(None, {"x": x})
    assert _rel(got, ref) <= 1e-5
