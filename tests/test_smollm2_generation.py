"""SmolLM2-135M-Instruct (the real GGUF) through the cache path: decoding token by token reproduces the
full-sequence logits (≤ 1e-5 relative), ``lowbit eval --ppl --cache`` (token by token) equals whole-window perplexity, and a lowbit-compiled ``--format genai`` folder generates text through
onnxruntime-genai's ``Generator`` and optimum's ``ORTModelForCausalLM.generate()`` — the same greedy tokens as
lowbit's own generation on the same graph.  Slow (a SmolLM2 compile): CI's ``-m slow`` step runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import require_data
from generation_peers import genai_tokens, lowbit_tokens

from lowbit.api.cli import main as cli

pytestmark = pytest.mark.slow
GGUF = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time, there was a little girl named"
OPTIMUM_PY = Path(__file__).resolve().parents[1] / ".venv-optimum" / "bin" / "python"


def test_smollm2_token_by_token_decode_reproduces_full_sequence_logits():
    import numpy as np

    import lowbit
    from lowbit.ir.sessions import make_session
    from lowbit.runtime import KVSession

    path = require_data(GGUF)
    ids = np.array([1, 9906, 2188, 253, 655, 28, 665, 436, 253, 1345, 2767, 2462, 30265, 30, 1652, 3714, 288, 1801,
                    15, 2140, 2591, 30])
    full = make_session(lowbit.load_model(path)).run(["logits"], {"input_ids": ids[None]})[0][0]
    s = KVSession(lowbit.load_model(path, kv_cache=True))
    got = np.concatenate([s.step(ids[:4], last_only=False)[0]] +
                         [s.step(ids[t : t + 1], last_only=False)[0] for t in range(4, len(ids))])
    assert got.shape == full.shape
    assert np.max(np.abs(got - full)) <= 1e-5 * np.max(np.abs(full))


def test_smollm2_cache_path_perplexity_equals_window(tinystories, capsys):
    common = [str(require_data(GGUF)), "--ppl", str(tinystories), "--stories", "600:601", "--seq-len", "64",
              "--json"]
    assert cli(["eval", *common]) == 0
    window = json.loads(capsys.readouterr().out)
    assert cli(["eval", *common, "--cache"]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert cached["path"] == "cache" and window["path"] == "window"
    assert cached["tokens"] == window["tokens"] > 64
    assert abs(cached["nll"] - window["nll"]) <= 1e-5 * window["nll"]


@pytest.fixture(scope="module")
def smollm2_genai(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-genai") / "model"
    assert cli(["compile", str(require_data(GGUF)), "--kv-cache", "--recipe", "w8a8-dynamic-nosmooth",
                "--format", "genai", "-o", str(out), "--json"]) == 0
    return out


def test_onnxruntime_genai_generates_smollm2_text(smollm2_genai):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    prompt_ids, ours, our_text = lowbit_tokens(smollm2_genai, PROMPT, 12)
    ids, theirs, text = genai_tokens(og, smollm2_genai, PROMPT, 12)
    assert ids == prompt_ids
    assert len(ours) >= 4 and theirs[: len(ours)] == ours
    assert len(text.split()) >= 3 and text.strip().startswith(our_text.strip())


def test_optimum_generates_smollm2_text(smollm2_genai):
    if not OPTIMUM_PY.exists():
        pytest.skip("no .venv-optimum (optimum-onnx needs transformers < 4.58; .ci/run creates it)")
    _, ours, _ = lowbit_tokens(smollm2_genai, PROMPT, 10)
    code = ("import json,sys\nfrom optimum.onnxruntime import ORTModelForCausalLM\n"
            "from transformers import AutoTokenizer\n"
            "tok=AutoTokenizer.from_pretrained(sys.argv[1]); m=ORTModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "enc=tok(sys.argv[2], return_tensors='pt')\n"
            "out=m.generate(**enc, max_new_tokens=10, do_sample=False)\n"
            "new=out[0, enc['input_ids'].shape[1]:]\n"
            "print(json.dumps({'ids': new.tolist(), 'text': tok.decode(new)}))\n")
    res = subprocess.run([str(OPTIMUM_PY), "-c", code, str(smollm2_genai), PROMPT], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(ours) >= 4 and theirs["ids"][: len(ours)] == ours
    assert len(theirs["text"].split()) >= 3
