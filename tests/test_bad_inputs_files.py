"""Bad files (issue 17): FIFOs and devices refused before anything blocks, over-long paths, truncated
Hugging Face configs and safetensors, badly encoded or binary text, tokenizers and calibration that
cannot be read.  Each: exit code 2, one ``error:`` line naming the file, no traceback, nothing written."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from bad_input_cases import cli_refuses, npz_dir, story_text, text_llama
from robust_models import tiny_llama, token_feeds

import lowbit
from lowbit.errors import LowbitError

LONG = "n" * 300


def _w(path: Path, data: bytes | str = b"x") -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _hf(tmp: Path, config: bytes | None, safetensors: bytes | None) -> Path:
    d = tmp / "hf"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_bytes(config)
    if safetensors is not None:
        (d / "model.safetensors").write_bytes(safetensors)
    return d


def _st(header: dict | bytes, body: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


GOOD_CFG = b'{"model_type": "bert", "hidden_size": 8}'
TENSOR = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}

# id: (builder of the model argument, text the error line must hold)
MODEL_CASES = {
    "fifo-bin": (lambda t: _fifo(t / "m.bin"), "is a FIFO (named pipe), not a regular file"),
    "fifo-onnx": (lambda t: _fifo(t / "m.onnx"), "is a FIFO (named pipe), not a regular file"),
    "dev-zero": (lambda t: Path("/dev/zero"), "'/dev/zero': is a character device"),
    "dev-null-bin": (lambda t: Path("/dev/null"), "'/dev/null': is a character device"),
    "name-too-long": (lambda t: t / (LONG + ".onnx"), "longer than the file system allows"),
    "parent-is-file": (lambda t: _w(t / "f") / "m.onnx", "a parent in the path is not a folder"),
    "hf-truncated-config": (lambda t: _hf(t, GOOD_CFG[:17], _st(TENSOR, bytes(16))), "config.json: not valid JSON"),
    "hf-empty-config": (lambda t: _hf(t, b"", _st(TENSOR, bytes(16))), "config.json: not valid JSON"),
    "hf-config-list": (lambda t: _hf(t, b"[1, 2]", _st(TENSOR, bytes(16))), "holds a JSON list, not an object"),
    "hf-config-latin1": (lambda t: _hf(t, b'{"a": "\xe9"}', _st(TENSOR, bytes(16))), "is not valid UTF-8"),
    "hf-config-fifo": (lambda t: _fifo(_hf(t, None, None) / "config.json").parent, "is a FIFO"),
    "st-too-short": (lambda t: _hf(t, GOOD_CFG, b"\x01\x02"), "too short for a safetensors file"),
    "st-header-past-end": (lambda t: _hf(t, GOOD_CFG, _st(TENSOR, bytes(16), declared=10 ** 6)),
                           "does not fit the"),
    "st-tensor-past-end": (lambda t: _hf(t, GOOD_CFG, _st(TENSOR, bytes(7))), "tensor 'w' ends at byte 16"),
    "st-header-garbage": (lambda t: _hf(t, GOOD_CFG, _st(b"{not json", bytes(16))), "header is not valid JSON"),
    "st-bad-offsets": (lambda t: _hf(t, GOOD_CFG, _st({"w": {"dtype": "F32", "data_offsets": [9, 1]}})),
                       "tensor 'w' has no valid data_offsets"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_file(case, tmp_path, capsys):
    make, needle = MODEL_CASES[case]
    model = make(tmp_path)
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", model, "--recipe", "w8a8-dynamic-nosmooth", "-o", out], capsys, needle, out=out)
    with pytest.raises(LowbitError) as info:
        lowbit.load_model(model)
    assert needle in str(info.value)
    cli_refuses(["inspect", model], capsys, needle)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model, tok = text_llama(folder)
    (folder / "cal.txt").write_text(story_text(8))
    return model, tok, folder / "cal.txt"


TOKENIZER_CASES = {
    "dev-zero": (lambda t: Path("/dev/zero"), "tokenizer '/dev/zero': is a character device"),
    "fifo": (lambda t: _fifo(t / "tok.bin"), "is a FIFO"),
    "folder": (lambda t: (t / "tokdir").mkdir() or t / "tokdir", "tokdir: no usable tokenizer"),
    "missing": (lambda t: t / "nope.bin", "no such tokenizer file"),
    "name-too-long": (lambda t: t / (LONG + ".bin"), "longer than the file system allows"),
    "garbage": (lambda t: _w(t / "g.bin", b"\x07\x00\x00\x00" + b"\xff" * 13),
                "not a llama2.c tokenizer file"),
    "empty": (lambda t: _w(t / "e.bin", b""), "not a llama2.c tokenizer file"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_bad_tokenizer(case, llama, tmp_path, capsys):
    model, _, cal = llama
    make, needle = TOKENIZER_CASES[case]
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", model, "--calibration", cal, "--tokenizer", make(tmp_path), "-o", out], capsys, needle,
                out=out)


def _text(data: bytes):
    return lambda t: _w(t / "c.txt", data)


LATIN1 = story_text(4).replace("cat", "caf\u00e9").encode("latin-1")
UTF16 = story_text(4).encode("utf-16")

CALIBRATION_CASES = {
    "latin-1": (_text(LATIN1), ["is not valid utf-8", "--encoding"]),
    "utf-16-bom": (_text(UTF16), "UTF-16 byte-order mark: pass --encoding utf-16"),
    "binary-nul": (_text(b"\x00\x01\x02binary" * 100), "holds NUL bytes"),
    "bad-byte-late": (_text(b"good text " * 500 + b"\xff\xfe bad"), "byte 5000"),
    "fifo": (lambda t: _fifo(t / "c.txt"), "is a FIFO"),
    "dev-zero": (lambda t: Path("/dev/zero"), "'/dev/zero': is a character device"),
    "dev-urandom": (lambda t: Path("/dev/urandom"), "is a character device"),
    "empty": (_text(b""), "holds no samples"),
    "only-separators": (_text(b"<|endoftext|>  <|endoftext|>\n"), "holds no samples"),
    "name-too-long": (lambda t: t / (LONG + ".txt"), "longer than the file system allows"),
    "npz-fifo": (lambda t: _fifo(npz_dir(t / "cal", token_feeds(1)) / "001.npz").parent, "is a FIFO"),
    "npz-folder": (lambda t: (npz_dir(t / "cal", token_feeds(1)) / "x.npz").mkdir() or t / "cal", "is a folder"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_bad_calibration_file(case, llama, tmp_path, capsys):
    model, tok, _ = llama
    make, needle = CALIBRATION_CASES[case]
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", model, "--calibration", make(tmp_path), "--tokenizer", tok, "-o", out], capsys, needle,
                out=out)


@pytest.mark.parametrize("data, encoding", [(LATIN1, "latin-1"), (UTF16, "utf-16"), (LATIN1, "cp1252")])
def test_encoding_option_reads_the_text(data, encoding, llama, tmp_path):
    model, tok, _ = llama
    (tmp_path / "c.txt").write_bytes(data)
    res = lowbit.compile(model, "w8a8", calibration=tmp_path / "c.txt", tokenizer=tok, encoding=encoding,
                         output=tmp_path / "o.onnx", progress=False)
    assert res.report["calibration_samples"] == 4


OUTPUT_CASES = {
    "dump-ir-file": (lambda t: ["--dump-ir", _w(t / "f")], "--dump-ir"),
    "reproducer-file": (lambda t: ["--reproducer", _w(t / "f")], "it must be a folder"),
    "dump-ir-under-file": (lambda t: ["--dump-ir", _w(t / "f") / "d"], "is a file, not a"),
    "output-name-300": (lambda t: ["-o", t / "out" / (LONG + ".onnx")], "longer than a file name may be"),
    "output-is-folder": (lambda t: ["-o", (t / "out").mkdir() or t / "out"], "is a folder"),
    "save-missing-folder": (lambda t: ["--recipe", f"calibrate{{hessian=true}},assign-bits{{save={t}/no/p.json}},"
                                       "quantize-weights,lower-nbits"], "folder"),
    "plan-missing": (lambda t: ["--recipe", f"assign-bits{{plan={t}/none.json}},quantize-weights,lower-nbits"],
                     "no such file"),
    "plan-fifo": (lambda t: ["--recipe", f"assign-bits{{plan={_fifo(t / 'p.json')}}},quantize-weights,lower-nbits"],
                  "is a FIFO"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_output_or_instrument_path(case, tmp_path, capsys):
    model = tiny_llama(tmp_path / "tiny.onnx")
    cal = npz_dir(tmp_path / "cal", token_feeds(2))
    make, needle = OUTPUT_CASES[case]
    argv = make(tmp_path)
    out = tmp_path / "out2" / "m.onnx"
    args = ["compile", model, "--calibration", cal] + (argv if "-o" in argv else argv + ["-o", out])
    cli_refuses(args, capsys, needle, out=out)


def test_npz_reads_stay_bounded(tmp_path):
    """A calibration folder is read through the same regular-file check: a normal one still works."""
    cal = npz_dir(tmp_path / "cal", token_feeds(3))
    res = lowbit.compile(tiny_llama(tmp_path / "t.onnx"), "w8a8", calibration=str(cal), progress=False)
    assert res.report["calibration_samples"] == 3 and np.isfinite(res.report["weight_bytes"])


STS_ROWS = "main-captions\tMSRvid\t2012test\t0001\t{score}\tA man plays.\tA man is playing.\n"


@pytest.mark.parametrize("header", ["genre\tfile\tyear\tid\tscore\tsentence1\tsentence2\n", ""])
def test_sts_header_line_is_skipped(header, tmp_path):
    from lowbit.data.datasets import read_sts

    path = tmp_path / "sts.csv"
    path.write_text(header + "".join(STS_ROWS.format(score=s) for s in ("5.0", "2.5", "0.0")))
    a, b, scores = read_sts(path)
    assert scores.tolist() == [5.0, 2.5, 0.0] and a[0] == "A man plays."


@pytest.mark.parametrize("bad, needle", [("abc", "line 3: score column 'abc' is not a number"),
                                          ("nan", "line 3: score nan is not finite")])
def test_sts_bad_score_after_the_first_line_is_refused(bad, needle, tmp_path):
    from lowbit.data.datasets import read_sts
    from lowbit.errors import InputError

    path = tmp_path / "sts.csv"
    path.write_text("".join(STS_ROWS.format(score=s) for s in ("5.0", "2.5", bad)))
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        read_sts(path)
