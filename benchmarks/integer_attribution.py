"""Where int8-integer-only's error comes from: perplexity and logits' relative L2 to float after each
prefix of the recipe (or any pipelines given), on stories260K or a truncated SmolLM2.

    nice -n 19 python benchmarks/integer_attribution.py                      # stories260K, the recipe's prefixes + w8a8
    nice -n 19 python benchmarks/integer_attribution.py --smollm2-layers 4 --calib 0-7 --no-ppl

stories260K: calibration ``CALIB_STORIES`` (0–99), evaluation ``EVAL_STORIES`` (600–784), perplexity on
512-token windows (as ``benchmarks/integer_only.py``), L2 on the first ``--l2-windows`` 256-token windows.
``--smollm2-layers N``: SmolLM2-135M from its GGUF cut after N decoder layers (the final norm and the head
read layer N's residual stream) — a fast loop for the error of the first layers; its perplexity means
nothing (pass ``--no-ppl``), its logits' L2 to the cut float graph does.  Pipelines without
``lower-ort`` run through ``lower-lowbit`` on ORT with graph optimisation off (ORT would fuse the
per-channel QDQ into kernels that refuse per-channel zero points).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PREFIXES = ("migrate-steps", "dyadic", "integer-swiglu", "integer-norms", "integer-exits")


def _slice(text: str) -> slice:
    a, b = text.split("-")
    return slice(int(a), int(b) + 1)


def recipe_prefixes() -> list[str]:
    from lowbit.passmanager.recipes import RECIPES

    passes = RECIPES["int8-integer-only"].replace(",lower-lowbit,lower-ort", "").split(",")
    names = [p.split("{")[0] for p in passes]
    return [",".join(passes[: names.index(p) + 1]) for p in PREFIXES if p in names]


def truncated_smollm2(n_layers: int):
    """SmolLM2's graph with the final norm reading the residual stream that enters layer ``n_layers``."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    import lowbit
    from lowbit.data.datasets import data_dir

    model = lowbit.load_model(data_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    norms = [n for n in model.graph if n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization")]
    if n_layers < len(norms) // 2:
        norms[-1].replace_input_with(0, norms[2 * n_layers].inputs[0])
        RemoveUnusedNodesPass()(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipelines", nargs="*", help="default: the int8-integer-only prefixes, then w8a8")
    ap.add_argument("--smollm2-layers", type=int, default=0)
    ap.add_argument("--calib", default="0-99")
    ap.add_argument("--eval", default="600-784")
    ap.add_argument("--l2-windows", type=int, default=4)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--calib-form", choices=("stories", "stream"), default="stories",
                    help="calibration sequences: each story from its start with BOS (lowbit's default), or the "
                         "calibration stories' token stream cut into 256-token windows, as the evaluation is")
    args = ap.parse_args()

    import lowbit
    from lowbit.backends.lower_lowbit import LowerLowbit
    from lowbit.data.datasets import causal_lm_feeds, data_dir, read_stories
    from lowbit.ir.sessions import make_session
    from lowbit.passmanager.recipes import RECIPES
    from lowbit.runtime.llm import perplexity, token_stream

    d = data_dir()
    stories = read_stories(d / "tinystories" / "tinystories_hf_validation_head.eot.txt")
    if args.smollm2_layers:
        from lowbit.frontends.text_tokenizers import load_tokenizer

        src = truncated_smollm2(args.smollm2_layers)
        tok = load_tokenizer(d / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
        ppl_seq, batch = 256, 1
    else:
        from lowbit.data.tokenizers import Llama2cTokenizer

        src = d / "stories260K" / "stories260K.bin"
        tok = Llama2cTokenizer(d / "stories260K" / "tok512.bin")
        ppl_seq, batch = 512, 8
    fm = src if args.smollm2_layers else lowbit.load_model(src)
    name = fm.graph.inputs[0].name
    if args.calib_form == "stories":
        calib = causal_lm_feeds(tok, stories[_slice(args.calib)], 256, name)
    else:
        cs = token_stream(tok, stories[_slice(args.calib)])
        calib = [{name: cs[None, i:i + 256].astype(np.int64)} for i in range(0, len(cs) - 255, 256)]
    stream = token_stream(tok, stories[_slice(args.eval)])
    wins = [stream[i * 256:(i + 1) * 256][None].astype(np.int64) for i in range(args.l2_windows)]
    from lowbit.ir.sessions import to_proto

    proto = to_proto(fm)
    sess = make_session(proto)
    ref = np.concatenate([sess.run(None, {name: w})[0] for w in wins])
    base = None if args.no_ppl else perplexity(sess, stream, seq_len=ppl_seq, batch=batch).ppl
    del sess
    print(f"fp32: ppl {base}", flush=True)
    for pipe in args.pipelines or [*recipe_prefixes(), "w8a8"]:
        t = time.perf_counter()
        import onnx_ir as ir

        res = lowbit.compile(ir.serde.deserialize_model(proto), pipe, calibration=calib, calibration_samples=None,
                             progress=False)
        m = res.model
        lowered = "lower-ort" in RECIPES.get(pipe, pipe)
        if not lowered:
            LowerLowbit()(m)
        s = make_session(m, optimize=lowered)
        y = np.concatenate([s.run(None, {name: w})[0] for w in wins])
        l2 = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        line = f"{pipe}: logits rel L2 {l2:.4f}"
        if base is not None:
            p = perplexity(s, stream, seq_len=ppl_seq, batch=batch).ppl
            line += f", ppl {p:.4f} ({100 * (p / base - 1):+.2f} %)"
        print(f"{line}  [{time.perf_counter() - t:.0f} s]", flush=True)
        del s, m, res


if __name__ == "__main__":
    main()
