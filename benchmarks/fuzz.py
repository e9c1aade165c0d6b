"""Longer fuzzing campaigns over the model loader and the pipeline-string parser.

    python benchmarks/fuzz.py --seconds 600            # split evenly over the targets
    python benchmarks/fuzz.py --target loader --seconds 3600 --crashes crashes/

A mutation fuzzer (no coverage feedback): loader inputs are a real small ONNX model (a 1-layer
Llama built by lowbit's llama2.c frontend, ≈12 KB) with 1-8 random byte-level mutations (bit
flips, interesting bytes, inserts, deletes, truncation, duplicated or spliced ranges); parser
inputs are mutated well-formed pipeline strings over the registered passes and their options.
Every exception other than ``LowbitError`` is a crash: its input is written to ``--crashes`` and
its type and message are tallied.  Prints a table of inputs tried, accepted, refused and crashes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lowbit
from lowbit.ir.analysis import find_groups, find_linears
from lowbit.api.driver import check_weights
from lowbit.errors import LowbitError
from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
from lowbit.passmanager.manager import CompileContext, PassManager, registered_passes
from lowbit.passmanager.pipeline import parse_pipeline
from lowbit.passmanager.recipes import RECIPES
from lowbit.ir.sessions import to_proto

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x08, 0x10, 0x12, 0x1A, 0x22, 0x3A, 0x42]


def seed_model() -> bytes:
    cfg = LlamaConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, seq_len=8)
    return to_proto(build_llama(cfg, random_llama_weights(cfg))).SerializeToString()


def mutate_bytes(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        op = rng.choice(["flip", "set", "insert", "delete", "truncate", "duplicate", "splice"])
        pos = rng.randrange(len(data))
        if op == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "set":
            data[pos] = rng.choice(_INTERESTING)
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del data[pos : pos + rng.randint(1, 64)]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            data[pos:pos] = data[pos : pos + rng.randint(1, 256)]
        else:  # splice a range of the seed elsewhere
            a = rng.randrange(len(seed))
            data[pos:pos] = seed[a : a + rng.randint(1, 128)]
    return bytes(data)


def pipeline_seeds() -> list[str]:
    seeds = list(RECIPES.values())
    for name, cls in registered_passes().items():
        opts = ",".join(f"{f.name}={str(f.default).lower() if isinstance(f.default, bool) else f.default}"
                        for f in dataclasses.fields(cls.Options) if f.default != "")
        seeds.append(f"{name}{{{opts}}}" if opts else name)
    return seeds


_ALPHABET = "abcdefghijklmnopqrstuvwxyz-_{}=,.0123456789 |:/+;\"'\\\n\t\u00e9\u0663\u2028"


def mutate_text(rng: random.Random, seeds: list[str]) -> str:
    text = rng.choice(seeds)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["char", "insert", "delete", "join", "swap-value"])
        pos = rng.randrange(len(text) + 1)
        if op == "char" and text:
            text = text[: max(pos - 1, 0)] + rng.choice(_ALPHABET) + text[pos:]
        elif op == "insert":
            text = text[:pos] + "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 4))) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + rng.randint(1, 6):]
        elif op == "join":
            text = text + rng.choice([",", ", ", ",,", ""]) + rng.choice(seeds)
        elif "=" in text:
            i = text.index("=", rng.randrange(text.index("=") + 1) if text.count("=") else 0)
            j = min([k for k in (text.find(",", i), text.find("}", i)) if k > 0] or [len(text)])
            text = text[: i + 1] + rng.choice(["-1", "0", "1e999", "nan", "none", "true", "", "x" * 40, "99999999999"]) + text[j:]
    return text


def load_target(path: Path):
    def run(data: bytes):
        path.write_bytes(data)
        model = lowbit.load_model(path)
        check_weights(model)
        find_linears(model.graph)
        find_groups(model.graph)
    return run


def parse_target(text: str):
    p = parse_pipeline(text)
    assert str(parse_pipeline(str(p))) == str(p), f"round trip of {text!r} changed"


def manager_target(text: str):
    PassManager.from_pipeline(text, CompileContext()).check_order()


def campaign(name, target, make_input, seconds, crashes_dir, rng):
    counts = collections.Counter()
    kinds = collections.Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = make_input(rng)
        counts["inputs"] += 1
        try:
            target(data)
            counts["accepted"] += 1
        except LowbitError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what we are looking for
            counts["crashes"] += 1
            kind = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            kinds[kind] += 1
            if crashes_dir is not None and kinds[kind] <= 3:
                crashes_dir.mkdir(parents=True, exist_ok=True)
                stem = crashes_dir / f"{name}-{counts['crashes']:05d}"
                if isinstance(data, bytes):
                    stem.with_suffix(".onnx").write_bytes(data)
                else:
                    stem.with_suffix(".txt").write_text(data, encoding="utf-8", errors="surrogateescape")
                stem.with_suffix(".trace").write_text(traceback.format_exc())
    return counts, kinds


STRUCTURED = ("structured-graphs", "structured-plans", "structured-calibration", "structured-pass-options",
              "structured-cli-options")


def structured_campaign(name: str, seconds: float, seed: int):
    """Structure-aware campaign (issue 17): hypothesis batches of 25 examples, reseeded until time is up.

    The strategies and checks are ``tests/fuzz_strategies.py`` (the same ones CI runs, briefly); a failing
    batch is shrunk by hypothesis and its minimal example recorded as the crash kind."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fuzz_strategies as fs
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from robust_models import tiny_llama

    tmp = tempfile.TemporaryDirectory(prefix="lowbit-sfuzz-")
    folder = Path(tmp.name)
    tiny = tiny_llama(folder / "tiny.onnx")
    counts, kinds = collections.Counter(), collections.Counter()

    def run_one(check, *args):
        with tempfile.TemporaryDirectory(dir=folder) as d:
            counts["inputs"] += 1
            counts[check(*args, Path(d)) if check in (fs.check_graph, fs.check_plan, fs.check_calibration,
                                                      fs.check_cli_options) else check(*args)] += 1

    bodies = {
        "structured-graphs": (fs.graphs(), lambda c: run_one(fs.check_graph, *c)),
        "structured-plans": (fs.plans(), lambda p: run_one(fs.check_plan, p)),
        "structured-calibration": (fs.calibration_sets(), lambda f: run_one(fs.check_calibration, f, tiny)),
        "structured-pass-options": (fs.pass_option_strings(), lambda t: run_one(fs.check_pass_options, t)),
        "structured-cli-options": (fs.cli_option_lists(), lambda c: run_one(fs.check_cli_options, *c)),
    }
    strategy, body = bodies[name]
    end = time.monotonic() + seconds
    batch = 0
    while time.monotonic() < end:
        test = hseed(seed * 100003 + batch)(settings(max_examples=25, deadline=None, database=None,
                                                      suppress_health_check=list(HealthCheck))(given(strategy)(body)))
        batch += 1
        try:
            test()
        except Exception as exc:  # noqa: BLE001 - a crash, wrong result or partial output
            counts["crashes"] += 1
            kinds[f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"] += 1
    counts["accepted"] += 0
    tmp.cleanup()
    return counts, kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="total time, split over the targets")
    ap.add_argument("--target", choices=["all", "loader", "parser", "manager", "structured", *STRUCTURED],
                    default="all", help="'structured' runs every structure-aware target (issue 17)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crashes", type=Path, help="write crashing inputs (and tracebacks) here")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # onnx_ir warns about every invalid model it repairs
    seed = seed_model()
    texts = pipeline_seeds()
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as tmp:
        targets = {
            "loader": (load_target(Path(tmp) / "m.onnx"), lambda r: mutate_bytes(r, seed)),
            "parser": (parse_target, lambda r: mutate_text(r, texts)),
            "manager": (manager_target, lambda r: mutate_text(r, texts)),
        }
        chosen = (list(targets) + list(STRUCTURED) if args.target == "all" else list(STRUCTURED)
                  if args.target == "structured" else [args.target])
        rng = random.Random(args.seed)
        print(f"{'target':<24} {'inputs':>9} {'accepted':>9} {'refused':>9} {'crashes':>8} {'inputs/s':>9}")
        total_crashes = 0
        for name in chosen:
            seconds = args.seconds / len(chosen)
            if name in STRUCTURED:
                counts, kinds = structured_campaign(name, seconds, args.seed)
            else:
                fn, make = targets[name]
                counts, kinds = campaign(name, fn, make, seconds, args.crashes, rng)
            total_crashes += counts["crashes"]
            print(f"{name:<24} {counts['inputs']:>9} {counts['accepted']:>9} {counts['refused']:>9} "
                  f"{counts['crashes']:>8} {counts['inputs'] / seconds:>9.0f}")
            for kind, n in kinds.most_common():
                print(f"         {n:>6} × {kind}")
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
