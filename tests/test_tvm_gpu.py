"""CUDA parity (runs only where TVM sees a GPU; the lent H100 runs benchmarks/tvm_gpu.py instead)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")
if not tvm.cuda(0).exist:
    pytest.skip("no CUDA device visible to TVM", allow_module_level=True)

from lowbit.backends.tvm_lower import lower_tvm  # noqa: E402
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights  # noqa: E402
from lowbit.ir.sessions import make_session, to_proto  # noqa: E402
from lowbit.runtime.tvm_runner import TvmSession  # noqa: E402

import tvm_graphs as tg  # noqa: E402

CFG = LlamaConfig(dim=1024, hidden_dim=2048, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=1024, seq_len=16)


@pytest.mark.parametrize("seq", [1, 8])
def test_cuda_4bit_llama_matches_ort(tmp_path, seq):
    model = ir.serde.deserialize_model(tg.matmulnbits(to_proto(build_llama(CFG, random_llama_weights(CFG))), 4, 128))
    tok = np.random.default_rng(seq).integers(0, CFG.vocab_size, (1, seq)).astype(np.int64)
    art = lower_tvm(model, "cuda", tmp_path, shape_dict={"tokens": [1, seq]})
    got, = TvmSession(art.lib).run(None, {"tokens": tok})
    ref, = make_session(model).run(None, {"tokens": tok})
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
