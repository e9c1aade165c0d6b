"""KV-cache form checks on real models: cached decode vs full logits, greedy generation, GGUF perplexity.

    python benchmarks/kv_check.py [--smollm]

* stories260K: the first 256 tokens of TinyStories story 600 through the cache-less graph at once and
  through the KV graph one token at a time: max |Δlogit| / max |logit|; greedy
  generation from BOS through the cache (60 tokens).
* ``--smollm``: SmolLM2-135M from its GGUF (FP32 after dequantisation), the MANIFEST's protocol:
  stories 200 onward, each prefixed with token 0, 512-token windows overlapping by one, the first
  20,000 scored tokens (MANIFEST: NLL 2.1456, ppl 8.55); then the KV-graph check on 128 tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lowbit
from lowbit.data.datasets import data_dir, read_stories
from lowbit.frontends.text_tokenizers import load_tokenizer
from lowbit.runtime.llm import perplexity, token_stream
from lowbit.ir.sessions import make_session


def kv_logits(sess, ids: np.ndarray) -> np.ndarray:
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros([1 if d == "batch" else (0 if isinstance(d, str) else d) for d in i.shape], np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_")}
    out = []
    for t in range(ids.shape[1]):
        res = sess.run(None, {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                              "position_ids": np.array([[t]]), **past})
        out.append(res[0])
        past = {n.replace("present", "past_key_values"): r for n, r in zip(names[1:], res[1:])}
    return np.concatenate(out, axis=1)


def greedy(sess, prompt: list[int], steps: int, eos: int) -> list[int]:
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros([1 if d == "batch" else (0 if isinstance(d, str) else d) for d in i.shape], np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_")}
    seq, new = list(prompt), list(prompt)
    for _ in range(steps):
        n = len(seq)
        res = sess.run(None, {"input_ids": np.array([new]), "attention_mask": np.ones((1, n), np.int64),
                              "position_ids": np.arange(n - len(new), n)[None], **past})
        past = {k.replace("present", "past_key_values"): r for k, r in zip(names[1:], res[1:])}
        nxt = int(np.argmax(res[0][0, -1]))
        if nxt == eos:
            break
        seq.append(nxt)
        new = [nxt]
    return seq


def check(path, ids) -> None:
    full_sess = make_session(lowbit.load_model(path))
    full = full_sess.run(None, {full_sess.get_inputs()[0].name: ids})[0]
    got = kv_logits(make_session(lowbit.load_model(path, kv_cache=True)), ids)
    print(f"  {path.name}: {ids.shape[1]} tokens one at a time through the KV graph vs the full graph: "
          f"max |diff| / max |logit| = {np.max(np.abs(got - full)) / np.max(np.abs(full)):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm", action="store_true")
    args = ap.parse_args()
    d = data_dir()
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    bin_path, tok_path = d / "stories260K" / "stories260K.bin", d / "stories260K" / "tok512.bin"
    tok = load_tokenizer(tok_path)
    ids = np.array([tok.encode(stories[600])[:256]])
    print("stories260K")
    check(bin_path, ids)
    sess = make_session(lowbit.load_model(bin_path, kv_cache=True))
    print("  greedy from BOS through the cache:", repr(tok.decode(greedy(sess, [1], 60, eos=2))))
    if args.smollm:
        del sess
        path = d / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        t0 = time.perf_counter()
        model = lowbit.load_model(path)
        gtok = load_tokenizer(model.metadata_props["lowbit.tokenizer"])
        stream = token_stream(gtok, stories[200:])[:20001]
        p = perplexity(make_session(model), stream, seq_len=512, batch=1)  # batch 1: bounded memory
        print(f"SmolLM2 (GGUF → FP32), stories 200+, {p.tokens} tokens: NLL {p.nll:.4f}, ppl {p.ppl:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
        check(path, np.array([gtok.encode(stories[600])[:128]]))


if __name__ == "__main__":
    main()
