"""Shared checks for the bad-input suites (``test_bad_inputs*.py``).

``cli_refuses`` runs the CLI in-process and ``cli_refuses_subprocess`` as a real process (with a
timeout: a hang is a failure); both assert the contract of issue 17: the exit code, exactly one
``error:`` line naming the thing, no traceback, and nothing left at the output path (temp folders
included).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from lowbit.api.cli import main

__all__ = ["cli_refuses", "cli_refuses_subprocess", "nothing_at", "npz_dir", "story_text", "plan_dict", "lowbit_cmd",
           "COUNTS", "write_tokenizer", "text_llama"]

COUNTS: dict[str, int] = {}


def lowbit_cmd() -> list[str]:
    return [sys.executable, "-m", "lowbit.api.cli"]


def nothing_at(out: Path) -> None:
    """No file at ``out`` and nothing (not even a hidden temp folder) beside it."""
    assert not out.exists(), out
    folder = out.parent
    if folder.exists():
        left = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith(out.name)]
        assert left == [], left


def _check(rc: int, err: str, code: int, needles, out: Path | None, command: str | None) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if "error:" in ln]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert len(error_lines) == 1, err
    line = error_lines[0]
    if command:
        assert line.startswith(f"lowbit {command}: error:"), line
    for needle in [needles] if isinstance(needles, str) else needles:
        assert needle in line, (needle, line)
    if out is not None:
        nothing_at(out)


def cli_refuses(args: list[str], capsys, needles, *, out: Path | None = None, code: int = 2) -> str:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    _check(rc, err, code, needles, out, args[0] if args and not str(args[0]).startswith("-") else None)
    return err


def cli_refuses_subprocess(args: list[str], needles, *, out: Path | None = None, code: int = 2,
                           timeout: float = 120, env: dict | None = None) -> str:
    proc = subprocess.run(lowbit_cmd() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    _check(proc.returncode, proc.stderr, code, needles, out, str(args[0]))
    return proc.stderr


def npz_dir(folder: Path, feeds: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def story_text(n: int = 8) -> str:
    return "<|endoftext|>".join(f"Once upon a time there was a cat number {i}. It liked milk." for i in range(n))


def plan_dict(names=("w",), shape=(4, 4)) -> dict:
    return {"version": 1, "budget": "avg_bits", "target": 4.0, "estimator": "cheap", "fixed_bytes": 0, "model": "",
            "extra": {}, "layers": [{"name": n, "shape": list(shape), "bits": 4, "group": 0, "bytes": 16,
                                     "est_error": None, "measured_error": None, "split": None} for n in names]}


def write_tokenizer(path: Path, vocab: int = 512) -> Path:
    """A llama2.c tokenizer file: <unk>, <s>, </s>, 256 byte tokens, printable ASCII, then filler pieces."""
    import struct

    pieces = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [bytes([c]) for c in range(32, 127)]
    pieces += [b" " + bytes([c]) for c in range(97, 123)]
    pieces += [f"~{i}".encode() for i in range(vocab - len(pieces))]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces[:vocab]):
            f.write(struct.pack("<fi", -float(i) if i > 258 else 0.0, len(p)) + p)
    return path


def text_llama(folder: Path) -> tuple[Path, Path]:
    """(model.onnx, tok.bin): a 1-layer random Llama with a 512-token vocabulary and a matching tokenizer."""
    from lowbit.frontends.llama2c import LlamaConfig, build_llama, random_llama_weights
    from lowbit.ir.model_io import save_onnx

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, seq_len=64)
    model = save_onnx(build_llama(cfg, random_llama_weights(cfg, 1)), folder / "llama.onnx")
    return model, write_tokenizer(folder / "tok.bin")
