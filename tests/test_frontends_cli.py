"""CLI over the new frontends: a Hugging Face decoder folder with its own tokenizer, --kv-cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit.api.cli import main
from lowbit.ir.sessions import make_session

from test_hf_decoders import save_tiny

STORIES = ["Once upon a time the cat sat on the mat and the dog ran to the park .",
           "Once there was a big red ball . The girl saw the ball and she was happy .",
           "Once , a boy had a toy car . He liked the car and he played all day ."] * 3


def _folder(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tiny-llama"
    save_tiny("llama", folder)
    words = sorted({w for s in STORIES for w in s.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    text = tmp_path / "stories.txt"
    text.write_text("".join(s + "\n<|endoftext|>\n" for s in STORIES))
    return folder, text


def test_eval_ppl_and_kv_compile_with_the_folders_tokenizer(tmp_path, capsys):
    folder, text = _folder(tmp_path)
    assert main(["eval", str(folder), "--ppl", str(text), "--seq-len", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] > 100 and 1.0 < res["ppl"] < 1000 and np.isfinite(res["nll"])
    out = tmp_path / "kv.w8a16.onnx"
    assert main(["compile", str(folder), "--kv-cache", "--recipe", "w8a16", "--calibration", str(text),
                 "--tokenizer", str(folder), "--calibration-samples", "4", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    sess = make_session(out)
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    feed = {"input_ids": np.array([[3, 4, 5]]), "attention_mask": np.ones((1, 3), np.int64),
            "position_ids": np.arange(3)[None]}
    feed.update({n: np.zeros((1, 2, 0, 8), np.float32) for n in names[3:]})
    res = sess.run(None, feed)
    assert res[0].shape == (1, 3, 96) and np.all(np.isfinite(res[0])) and res[1].shape == (1, 2, 3, 8)
