"""GGUF frontend: synthetic files written with the gguf package, checked against an independent numpy
dequantization (tests/gguf_reference.py) and numpy forward (tests/llama_reference.py); the real
SmolLM2 file as a slow smoke test."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.frontends.llama2c import LlamaConfig, read_llama2c
from lowbit.frontends.text_tokenizers import load_tokenizer
from lowbit.ir.sessions import make_session
from lowbit.data.tokenizers import Llama2cTokenizer

from gguf_reference import BLOCK, DEQUANT
from llama_reference import forward as numpy_forward
from test_decoder_kv import decode_stepwise

gguf = pytest.importorskip("gguf")

_ROLES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "w1": "ffn_gate", "w2": "ffn_down",
          "w3": "ffn_up", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _tensors(cfg, w):
    out = {"token_embd.weight": w["embed"], "output_norm.weight": w["final_norm"]}
    for key, role in _ROLES.items():
        for i in range(cfg.n_layers):
            out[f"blk.{i}.{role}.weight"] = w[key][i]
    return out


def write_gguf(path, cfg, raw: dict, qtypes: dict, tokenizer: Llama2cTokenizer | None = None):
    """``raw``: name → float32 array or (for a quantized name in ``qtypes``) uint8 [rows, bytes]."""
    wr = gguf.GGUFWriter(str(path), "llama")
    wr.add_block_count(cfg.n_layers)
    wr.add_context_length(cfg.seq_len)
    wr.add_embedding_length(cfg.dim)
    wr.add_feed_forward_length(cfg.hidden_dim)
    wr.add_head_count(cfg.n_heads)
    wr.add_head_count_kv(cfg.n_kv_heads)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    if tokenizer is not None:
        wr.add_tokenizer_model("llama")
        wr.add_token_list([p.decode("utf-8").replace(" ", "\u2581") for p in tokenizer.pieces])
        wr.add_token_scores([float(s) for s in tokenizer.scores])
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
    for name, arr in raw.items():
        if name in qtypes:
            wr.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType[qtypes[name]])
        else:
            wr.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def reference_weights(cfg, raw, qtypes):
    """llama2.c-layout float weights, dequantized by gguf_reference (not by the gguf package)."""
    deq = {n: (DEQUANT[qtypes[n]](a) if n in qtypes else np.asarray(a, np.float32)) for n, a in raw.items()}
    w = {"embed": deq["token_embd.weight"], "final_norm": deq["output_norm.weight"]}
    for key, role in _ROLES.items():
        w[key] = np.stack([deq[f"blk.{i}.{role}.weight"] for i in range(cfg.n_layers)])
    w["head"] = w["embed"]
    return w


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_stories260k_gguf_matches_numpy_dequant_and_forward(stories_bin, stories_tok, tmp_path, qtype):
    cfg, w = read_llama2c(stories_bin)
    raw, qtypes = _tensors(cfg, w), {}
    if qtype != "F32":
        for name, a in list(raw.items()):
            if a.ndim == 2 and a.shape[1] % 32 == 0:  # ffn_down rows (172) do not fit: they stay F32
                raw[name] = gguf.quants.quantize(np.ascontiguousarray(a, np.float32),
                                                 gguf.GGMLQuantizationType[qtype])
                qtypes[name] = qtype
    tok = Llama2cTokenizer(stories_tok)
    path = tmp_path / f"stories.{qtype}.gguf"
    write_gguf(path, cfg, raw, qtypes, tokenizer=tok)
    ids = tok.encode("Once upon a time, there was a little girl named Lily. She liked cats.")
    ref = numpy_forward(cfg, reference_weights(cfg, raw, qtypes), ids)
    got = make_session(lowbit.load_model(path)).run(None, {"input_ids": np.array([ids])})[0][0]
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    if qtype == "Q8_0":  # the SentencePiece tokenizer from the file's metadata equals llama2.c's
        gtok = load_tokenizer(path)
        for text in ["Lily and Ben went to the park.", "Ünïcödé ☃ symbols", "a  b\nc"]:
            assert gtok.encode(text) == tok.encode(text)
            assert gtok.decode(gtok.encode(text)) == text


def _random_kquant_bytes(rng, rows, cols, qtype):
    elems, size = BLOCK[qtype]
    b = rng.integers(0, 256, (rows, cols // elems, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(0.5e-3, 2e-3, (rows, cols // elems, 1)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        b[..., 0:2], b[..., 2:4] = scale(1), scale(1)
    else:  # Q6_K: d is the last field
        b[..., 208:210] = scale(1)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_kquant_gguf_matches_numpy_dequant_and_forward(tmp_path, qtype):
    cfg = LlamaConfig(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=64)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 256), "blk.0.attn_q.weight": (256, 256), "blk.0.attn_k.weight": (128, 256),
              "blk.0.attn_v.weight": (128, 256), "blk.0.attn_output.weight": (256, 256),
              "blk.0.ffn_gate.weight": (256, 256), "blk.0.ffn_up.weight": (256, 256),
              "blk.0.ffn_down.weight": (256, 256)}
    raw = {n: _random_kquant_bytes(rng, r, c, qtype) for n, (r, c) in shapes.items()}
    qtypes = {n: qtype for n in raw}
    for n in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        raw[n] = rng.uniform(0.5, 1.5, 256).astype(np.float32)
    path = tmp_path / f"tiny.{qtype}.gguf"
    write_gguf(path, cfg, raw, qtypes)
    ids = [1, 5, 9, 33, 2, 60, 17]
    ref = numpy_forward(cfg, reference_weights(cfg, raw, qtypes), ids)
    model = lowbit.load_model(path)
    got = make_session(model).run(None, {"input_ids": np.array([ids])})[0][0]
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    kv = make_session(lowbit.load_model(path, kv_cache=True))
    stepped = decode_stepwise(kv, np.array([ids]), [2, 1, 1, 1, 1, 1], 1, 2, 64)[0]
    assert np.max(np.abs(stepped - got)) <= 1e-5 * np.max(np.abs(got))


def test_non_llama_gguf_is_refused(tmp_path):
    wr = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "falcon")
    wr.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(LowbitError, match="GGUF architecture 'falcon' is not supported"):
        lowbit.load_model(tmp_path / "m.gguf")


@pytest.mark.slow
def test_smollm2_gguf_perplexity_is_sane(tinystories):
    from conftest import require_data
    from lowbit.data.datasets import read_stories
    from lowbit.runtime.llm import perplexity, token_stream

    path = require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model = lowbit.load_model(path)
    tok = load_tokenizer(model.metadata_props["lowbit.tokenizer"])
    stream = token_stream(tok, read_stories(tinystories)[600:606])
    p = perplexity(make_session(model), stream, seq_len=512)
    assert p.tokens > 500 and 3.0 < p.ppl < 20.0  # MANIFEST: 8.55 on stories 200+


@pytest.mark.parametrize("pre, tail", [("smollm", ["Ġ", "1", "2"]), ("gpt2", ["Ġ", "12"])])
def test_gguf_byte_level_bpe_tokenizer(tmp_path, pre, tail):
    """Merges applied by rank inside pre-tokens; smollm splits digits one by one first (worked by hand)."""
    tokens = ["<|endoftext|>", "a", "b", "Ġ", "1", "2", "ab", "Ġab", "12"]
    wr = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(tokens)
    wr.add_token_merges(["a b", "Ġ ab", "1 2"])
    wr.add_token_types([3] + [1] * (len(tokens) - 1))
    wr.add_eos_token_id(0)
    wr.add_add_bos_token(False)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    tok = load_tokenizer(tmp_path / "t.gguf")
    ids = tok.encode("ab ab 12")
    assert [tokens[i] for i in ids] == ["<|endoftext|>", "ab", "Ġab"] + tail
    assert tok.decode(ids) == "ab ab 12"
