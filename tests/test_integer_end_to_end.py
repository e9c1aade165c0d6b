"""Integer from the embedding to the output: integer-attention + integer-norms on BERT graphs.

A tiny random-weight BERT (graph form only, no quality claim): float is left only at the embedding
sum (Gather/Add, one QuantizeLinear entry) and the output (one DequantizeLinear exit), and the
reference (numpy, ``lowbit`` ops by their references) equals ORT (their standard-op lowerings) on
every integer value.  The real MiniLM and stories260K run the same checks in test_integer_only.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit.backends.lower_lowbit import LowerLowbit
from lowbit.ir.integer_check import check_integer_regions
from lowbit.ir.sessions import make_session
from lowbit.passmanager.manager import CompileContext, PassManager
from lowbit.runtime.reference import compare_graph_with_ort

INTEGER = "calibrate{rows=256},migrate-steps,dyadic,integer-lut,integer-attention,integer-norms"
EDGES = {"Gather": 3, "Add": 2, "QuantizeLinear": 1, "DequantizeLinear": 1}  # embedding sum in, hidden state out


def _compile(src, pipeline, feeds):
    ctx = CompileContext(calibration=feeds, show_progress=False)
    return PassManager.from_pipeline(pipeline, ctx).run(lowbit.load_model(src)), ctx.report


def _token_feeds(n, seq, vocab, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, vocab, (1, seq)).astype(np.int64)
        mask = np.ones((1, seq), np.int64)
        mask[0, rng.integers(seq // 2, seq):] = 0  # padded tail: the mask path must become IntSoftmax's keep
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((1, seq), np.int64)})
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.slow  # the torch export alone takes ~30 s on 2 shared cores
def test_tiny_bert_is_integer_between_embedding_and_output(tiny_bert):
    calib, probes = _token_feeds(8, 16, 120, 0), _token_feeds(6, 12, 120, 1)
    fp32 = make_session(lowbit.load_model(tiny_bert))
    model, report = _compile(tiny_bert, INTEGER, calib)
    rep = check_integer_regions(model)
    assert dict(rep.float_ops) == EDGES and rep.integer_gemms == 2 * 6 + 2 * 2  # 6 linears + Q·Kᵀ + P·V per layer
    assert report["integer-attention"]["attention"] == 2 and report["integer-norms"]["norms"] >= 5
    compared, mismatches = compare_graph_with_ort(model, probes)
    assert compared > 6 * 60 and mismatches == []
    LowerLowbit()(model)
    got = make_session(model).run(None, probes[0])[0]
    want = fp32.run(None, probes[0])[0]
    keep = probes[0]["attention_mask"][0].astype(bool)
    assert np.linalg.norm(got[0, keep] - want[0, keep]) / np.linalg.norm(want[0, keep]) < 0.1
