"""The KV-cache decoder on TVM (backends/tvm_decoder.py, runtime/tvm_kv_session.py) on stories260K.

Expected values come from ONNX Runtime running the frontend's own (unrewritten) KV graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from lowbit.backends.tvm_decoder import symbolic_kv_form
from lowbit.errors import LowbitError
from lowbit.runtime.kv_session import KVSession

from conftest import require_data


def _stories(kv=True):
    from lowbit.frontends import load_model

    return load_model(str(require_data("stories260K/stories260K.bin")),
                      tokenizer=str(require_data("stories260K/tok512.bin")), kv_cache=kv)


def test_symbolic_kv_form_computes_what_the_graph_computed():
    model = _stories()
    ref = KVSession(model)
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert symbolic_kv_form(copy) == 2  # the causal mask's two Range nodes
    assert not any(n.op_type == "Range" for n in copy.graph)
    got = KVSession(copy)
    for ids in ([1, 403, 407, 261], [77], [5, 9]):  # prefill, then steps at past = 4 and 5
        np.testing.assert_array_equal(got.step(ids, last_only=False), ref.step(ids, last_only=False))


def test_symbolic_kv_form_refuses_a_graph_without_a_cache():
    with pytest.raises(LowbitError, match="not a KV-cache graph"):
        symbolic_kv_form(_stories(kv=False))


@pytest.mark.slow
def test_tvm_generation_matches_ort_token_for_token(tmp_path):
    pytest.importorskip("tvm")
    from lowbit.backends.tvm_decoder import lower_kv_tvm
    from lowbit.runtime.generate import generate
    from lowbit.runtime.tvm_kv_session import TvmKVSession

    model = _stories()
    art = lower_kv_tvm(model, "llvm", tmp_path)
    tvm_sess = TvmKVSession(art.lib)
    ort_gen = generate(KVSession(model), "Once upon a time", max_new_tokens=40, stop_at_eos=False)
    ort_ids = [t.id for t in ort_gen if t.id >= 0]
    tvm_gen = generate(tvm_sess, "Once upon a time", max_new_tokens=40, stop_at_eos=False)
    tvm_ids = [t.id for t in tvm_gen if t.id >= 0]
    assert len(ort_ids) == 40 and tvm_ids == ort_ids
    assert tvm_gen.text == ort_gen.text
    # one artifact, every length: a fresh prompt of another length, logits of every position
    tvm_sess.reset()
    ref = KVSession(model)
    for ids in ([1, 403, 407, 261, 378, 5, 9], [77], [12, 13, 14]):
        a, b = tvm_sess.step(ids, last_only=False), ref.step(ids, last_only=False)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


@pytest.mark.slow
def test_tvm_kv_decoder_runs_lowbit_4bit_kernels_at_every_length(tmp_path):
    """A 4-bit (ORT's own MatMulNBitsQuantizer) KV graph: every linear becomes lowbit's NBitsMatMul kernel."""
    pytest.importorskip("tvm")
    import json

    import tvm_graphs as tg

    from lowbit.backends.tvm_decoder import lower_kv_tvm
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
    from lowbit.ir.sessions import to_proto
    from lowbit.runtime.tvm_kv_session import TvmKVSession

    cfg = LlamaConfig(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64)
    proto = tg.matmulnbits(to_proto(build_llama(cfg, random_llama_weights(cfg), kv_cache=True)), 4, 32)
    model = ir.serde.deserialize_model(proto)
    art = lower_kv_tvm(model, "llvm", tmp_path)
    assert json.loads(art.meta.read_text())["prepare"]["matmulnbits"] == 2 * 7 + 1
    got, ref = TvmKVSession(art.lib), KVSession(model)
    for ids in ([1, 5, 9, 200], [7], [8, 9, 10]):
        a, b = got.step(ids, last_only=False), ref.step(ids, last_only=False)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
