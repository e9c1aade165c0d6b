"""``lowbit generate MODEL --prompt TEXT [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]``.

Streams the generated text as it is produced, through the KV cache (one prefill step, then one
decode step per token), and ends with prefill ms, decode ms/token and tokens/s.  MODEL is a
KV-cache .onnx (``lowbit compile ... --kv-cache``) or any decoder ``lowbit compile`` reads
(llama2.c .bin, Hugging Face folder, GGUF), run in float.  Greedy unless --temperature > 0.
"""

from __future__ import annotations

from lowbit.api.cli import emit


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text through the KV cache, streaming", description=__doc__)
    p.add_argument("model")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, i.e. start from BOS)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", help="tokenizer, if the model does not record one")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print text and timings as JSON at the end (no streaming)")
    p.add_argument("--backend", default="ort", choices=["ort", "tvm"],
                   help="tvm: compile the KV graph with TVM (symbolic lengths, one artifact) and run it there; "
                        "MODEL may also be such an artifact (.so from 'lowbit compile --kv-cache --backend tvm')")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"], help="TVM target (with --backend tvm)")
    p.set_defaults(func=run)


def _model(arg, tokenizer):
    from pathlib import Path

    if str(arg).endswith(".onnx"):
        if not Path(arg).is_file():
            from lowbit.errors import ModelLoadError

            raise ModelLoadError(f"{arg}: no such file", hint="check the model path")
        return str(arg)
    from lowbit.frontends import load_model

    return load_model(arg, tokenizer=tokenizer, kv_cache=True)


def _tvm_session(args):
    """A TvmKVSession: MODEL is a KV artifact (.so), or is compiled into one in a temporary folder."""
    import tempfile
    from pathlib import Path

    from lowbit.runtime.tvm_kv_session import TvmKVSession

    if str(args.model).endswith(".so"):
        if not Path(args.model).is_file():
            from lowbit.errors import ModelLoadError

            raise ModelLoadError(f"{args.model}: no such file", hint="check the artifact path")
        return TvmKVSession(args.model, device="cuda" if args.target == "cuda" else None)
    from lowbit.backends.tvm_decoder import lower_kv_tvm

    model = _model(args.model, args.tokenizer)
    out = tempfile.mkdtemp(prefix="lowbit-tvm-kv-")
    art = lower_kv_tvm(model, args.target, out)
    return TvmKVSession(art.lib)


def run(args) -> int:
    import sys

    from lowbit.runtime.generate import generate

    model = _tvm_session(args) if args.backend == "tvm" or str(args.model).endswith(".so") else \
        _model(args.model, args.tokenizer)
    gen = generate(model, args.prompt, tokenizer=args.tokenizer,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, chat=args.chat, threads=args.threads)
    for tok in gen:
        if not args.json:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    stats = gen.stats.as_dict()

    def human():
        print()
        print(f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} generated"
              f"{', stopped at EOS' if stats['stopped_by'] == 'eos' else ''}] prefill {stats['prefill_ms']:.1f} ms, "
              f"decode {stats['decode_ms_per_token']:.2f} ms/token, {stats['tokens_per_s']:.1f} tokens/s",
              file=sys.stderr)

    emit(args, {"model": args.model, "prompt": args.prompt, "text": gen.text, **stats}, human)
    return 0
