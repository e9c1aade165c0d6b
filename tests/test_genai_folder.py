"""--format genai: onnxruntime-genai's Generator and optimum's ORTModelForCausalLM load and run the folder,
and produce the same greedy tokens as lowbit's own generation on the same graph.

A tiny Llama with random weights (graph form only) and a byte-level BPE tokenizer, written as a Hugging Face
folder.  optimum-onnx needs transformers < 4.58, so it runs in its own venv ``.venv-optimum`` (made by
.ci/run); the test skips with that reason when the venv is absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from generation_peers import genai_tokens, lowbit_tokens

from lowbit.api.cli import main as cli

PROMPT = "Once upon a time there was"
OPTIMUM_PY = Path(__file__).resolve().parents[1] / ".venv-optimum" / "bin" / "python"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Once upon a time there was a little girl named Lily. She liked the park."] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "model_input_names": ["input_ids", "attention_mask"]}))
    conf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5) if p.ndim > 1 else p.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def genai_out(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / "model"
    assert cli(["compile", str(hf_folder), "--kv-cache", "--recipe", "w8a8-dynamic-nosmooth", "--format", "genai",
                "-o", str(out), "--json"]) == 0
    return out


def test_folder_layout_and_refusals(genai_out, hf_folder, tmp_path, capsys):
    names = {p.name for p in genai_out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    conf = json.loads((genai_out / "genai_config.json").read_text())["model"]
    assert conf["decoder"]["num_hidden_layers"] == 2 and conf["decoder"]["num_key_value_heads"] == 2
    assert conf["decoder"]["head_size"] == 16 and conf["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # a quantized cache is not drop-in; nothing is left at the output path
    bad = tmp_path / "bad"
    assert cli(["compile", str(hf_folder), "--kv-cache", "--recipe", "quantize-kv{k_mode=token}", "--format", "genai",
                "-o", str(bad)]) == 2
    assert "quantized" in capsys.readouterr().err and not bad.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
    assert cli(["compile", str(hf_folder), "--format", "genai", "-o", str(bad)]) == 2


def test_onnxruntime_genai_generator_matches_lowbit(genai_out):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    prompt_ids, ours, _ = lowbit_tokens(genai_out, PROMPT, 12)
    ids, theirs, _ = genai_tokens(og, genai_out, PROMPT, 12)
    assert ids == prompt_ids
    assert theirs[: len(ours)] == ours and len(ours) > 0


@pytest.mark.slow
def test_optimum_generate_matches_lowbit(genai_out):
    if not OPTIMUM_PY.exists():
        pytest.skip("no .venv-optimum (optimum-onnx needs transformers < 4.58; .ci/run creates it)")
    _, ours, _ = lowbit_tokens(genai_out, PROMPT, 10)
    code = ("import json,sys\nfrom optimum.onnxruntime import ORTModelForCausalLM\n"
            "from transformers import AutoTokenizer\n"
            "tok=AutoTokenizer.from_pretrained(sys.argv[1]); m=ORTModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "enc=tok(sys.argv[2], return_tensors='pt')\n"
            "out=m.generate(**enc, max_new_tokens=10, do_sample=False)\n"
            "print(json.dumps(out[0, enc['input_ids'].shape[1]:].tolist()))\n")
    res = subprocess.run([str(OPTIMUM_PY), "-c", code, str(genai_out), PROMPT], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert theirs[: len(ours)] == ours and len(ours) > 0
