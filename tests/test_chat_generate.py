"""Chat-template generation: the prompt ids that ``lowbit generate --chat`` feeds equal transformers'
``apply_chat_template`` (an independent renderer and, for GGUF, an independent tokenizer conversion)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require_data

from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.ir.model_io import save_onnx

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Once upon a time?"}]


def _tiny_kv_model(path, vocab: int):
    cfg = LlamaConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, seq_len=128)
    save_onnx(build_llama(cfg, random_llama_weights(cfg, seed=0), kv_cache=True), path)
    return path


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("chatml")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a little girl. You are brief. system user assistant"] * 20,
                            trainer)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "add_bos_token": False, "chat_template": CHATML}))
    return folder


def test_cli_chat_prompt_matches_transformers(chatml_folder, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from lowbit.api.cli import main
    from lowbit.runtime import generate

    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chatml_folder / "tokenizer.json"),
                                               chat_template=CHATML, eos_token="<|im_end|>")
    want = ref.apply_chat_template(MESSAGES[1:], add_generation_prompt=True, tokenize=False)
    want_ids = ref(want, add_special_tokens=False)["input_ids"]
    assert want_ids.count(ref.convert_tokens_to_ids("<|im_start|>")) == 2  # the special tokens are single ids
    model = _tiny_kv_model(tmp_path / "tiny.onnx", vocab=ref.vocab_size + 2)
    gen = generate(str(model), MESSAGES[1]["content"], tokenizer=str(chatml_folder), chat=True, max_new_tokens=3)
    list(gen)
    assert gen.prompt_ids == want_ids
    assert ref.convert_tokens_to_ids("<|im_end|>") in gen.codec.eos_ids
    gen = generate(str(model), MESSAGES, tokenizer=str(chatml_folder), max_new_tokens=1)  # a message list
    list(gen)
    assert gen.prompt_ids == ref(ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False)["input_ids"]
    assert main(["generate", str(model), "--tokenizer", str(chatml_folder), "--prompt", MESSAGES[1]["content"],
                 "--chat", "--max-new-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_tokens"] == len(want_ids) and res["new_tokens"] <= 2


def test_chat_refused_without_template(tmp_path, capsys, stories_bin):
    from lowbit.api.cli import main

    assert main(["generate", str(stories_bin), "--prompt", "hi", "--chat", "--max-new-tokens", "1"]) == 2
    assert "chat template" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_gguf_chat_prompt_matches_transformers(tmp_path):
    """SmolLM2-Instruct's own template (in its GGUF), rendered and tokenized by lowbit and by transformers'
    GGUF loader; generation through it stops at <|im_end|>."""
    transformers = pytest.importorskip("transformers")
    gguf_path = require_data("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    from lowbit.runtime import generate

    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    want = ref(ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]
    model = _tiny_kv_model(tmp_path / "tiny.onnx", vocab=len(ref))
    gen = generate(str(model), MESSAGES, tokenizer=str(gguf_path), max_new_tokens=2)
    list(gen)
    assert gen.prompt_ids == want
    assert ref.convert_tokens_to_ids("<|im_end|>") in gen.codec.eos_ids
    assert np.all(np.asarray(gen.ids) < len(ref))
