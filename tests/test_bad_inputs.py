"""Broken and hostile inputs: each gives a specific lowbit error naming what and where, the CLI
exits non-zero printing ``error:``, and nothing (not even a temp file) appears at the output path."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from robust_models import TINY, dir_listing, matmul_model, tiny_llama, tiny_weights, token_feeds

import lowbit
from lowbit.api.cli import main
from lowbit.errors import (CalibrationError, InvalidWeightsError, LowbitError, ModelLoadError, PipelineError,
                           UnsupportedModelError)


def _npz_dir(folder: Path, feeds: list[dict]) -> Path:
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder


def _tiny(tmp: Path) -> Path:
    return tiny_llama(tmp / "tiny.onnx")


def _bytes(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _mangled(kind: str):
    def make(tmp: Path) -> Path:
        raw = bytearray(_tiny(tmp).read_bytes())
        if kind == "truncated":
            raw = raw[: len(raw) // 2]
        else:  # flip every 997th byte past the header
            for i in range(100, len(raw), 997):
                raw[i] ^= 0xFF
        path = tmp / f"{kind}.onnx"
        path.write_bytes(bytes(raw))
        return path
    return make


def _opset(version: int):
    def make(tmp: Path) -> Path:
        proto = onnx.load(str(_tiny(tmp)))
        proto.opset_import[0].version = version
        path = tmp / f"opset{version}.onnx"
        path.write_bytes(proto.SerializeToString())
        return path
    return make


def _weights(mutate):
    def make(tmp: Path) -> Path:
        w = tiny_weights()
        mutate(w)
        return tiny_llama(tmp / "bad_weights.onnx", w)
    return make


def _set(key, index, value):
    def mutate(w):
        w[key][index] = value
    return mutate


DYN = "w8a8-dynamic-nosmooth"  # needs no calibration

# id: (model builder, recipe, calibration builder or None, error class, text the message must name)
MODEL_CASES = {
    "empty-file": (_bytes("empty.onnx", b""), DYN, None, ModelLoadError, "empty"),
    "truncated": (_mangled("truncated"), DYN, None, ModelLoadError, "truncated.onnx: cannot be parsed"),
    "corrupted": (_mangled("corrupted"), DYN, None, ModelLoadError, "corrupted.onnx: cannot be parsed"),
    "pickle-magic": (_bytes("evil.onnx", pickle.dumps({"a": 1}, protocol=4)), DYN, None, ModelLoadError,
                     "not an ONNX protobuf"),
    "zip-magic": (_bytes("zip.onnx", b"PK\x03\x04" + b"\0" * 60), DYN, None, ModelLoadError, "not an ONNX protobuf"),
    "gguf-magic": (_bytes("m.onnx", b"GGUF" + b"\x03" * 60), DYN, None, ModelLoadError, "not an ONNX protobuf"),
    "text-file": (_bytes("notes.onnx", b"this is a readme, not a model\n" * 4), DYN, None, ModelLoadError,
                  "notes.onnx: cannot be parsed"),
    "missing-file": (lambda tmp: tmp / "nope.onnx", DYN, None, ModelLoadError, "no such file"),
    "llama2c-garbage": (_bytes("junk.bin", struct.pack("<7i", 64, 0, -3, 8, 3, 512, 512) + b"\0" * 64), DYN, None,
                        ModelLoadError, "not a valid llama2.c config"),
    "llama2c-truncated": (_bytes("short.bin", struct.pack("<7i", 8, 16, 1, 2, 2, 16, 8) + b"\0" * 40), DYN, None,
                          ModelLoadError, "truncated"),
    "custom-domain-op": (lambda tmp: matmul_model(tmp / "c.onnx", extra_nodes=[("FooBar", "com.evil")],
                                                  extra_opsets=["com.evil"]), DYN, None, UnsupportedModelError,
                         "node 'extra0' (com.evil::FooBar)"),
    "unknown-standard-op": (lambda tmp: matmul_model(tmp / "u.onnx", extra_nodes=[("NotARealOp", "")]), DYN, None,
                            UnsupportedModelError, "'NotARealOp'"),
    "future-opset": (_opset(99), DYN, None, UnsupportedModelError, "opset 99"),
    "ancient-opset": (_opset(5), DYN, None, ModelLoadError, "opset 5 is too old"),
    "zero-dim-weight-rows": (lambda tmp: matmul_model(tmp / "z.onnx", (0, 4)), DYN, None, UnsupportedModelError,
                             "weight 'w' has a zero-sized dimension"),
    "zero-dim-weight-cols": (lambda tmp: matmul_model(tmp / "z.onnx", (4, 0)), DYN, None, UnsupportedModelError,
                             "weight 'w' has a zero-sized dimension"),
    "dynamic-weight": (lambda tmp: matmul_model(tmp / "d.onnx", weight_as_input=True), DYN, None, LowbitError,
                       "no linear layer to quantize"),
    "nan-weight": (_weights(_set("w2", (1, 3, 2), np.nan)), DYN, None, InvalidWeightsError,
                   "'layers.1.mlp.down_proj.weight'"),
    "inf-norm": (_weights(_set("attn_norm", (0, 3), np.inf)), DYN, None, InvalidWeightsError,
                 "'layers.0.attn_norm.weight'"),
    "neg-inf-embedding": (_weights(_set("embed", (5, 0), -np.inf)), DYN, None, InvalidWeightsError, "'embed.weight'"),
}

CALIB_CASES = {
    "no-calibration": (None, CalibrationError, "needs calibration samples"),
    "wrong-input-name": (lambda tmp: _npz_dir(tmp / "cal", [{"ids": np.ones((1, 4), np.int64)}]), CalibrationError,
                         "missing ['tokens']"),
    "wrong-dtype": (lambda tmp: _npz_dir(tmp / "cal", [{"tokens": np.ones((1, 4), np.int32)}]), CalibrationError,
                    "input 'tokens': dtype int32"),
    "wrong-rank": (lambda tmp: _npz_dir(tmp / "cal", [{"tokens": np.ones(4, np.int64)}]), CalibrationError,
                   "input 'tokens': rank 1"),
    "empty-sample": (lambda tmp: _npz_dir(tmp / "cal", [{"tokens": np.ones((1, 0), np.int64)}]), CalibrationError,
                     "input 'tokens' is empty"),
    "token-out-of-range": (lambda tmp: _npz_dir(tmp / "cal", token_feeds(1) + [{"tokens": np.array([[3, 999]])}]),
                           CalibrationError, "calibration sample 1 does not run"),
    "empty-folder": (lambda tmp: _npz_dir(tmp / "cal", []), CalibrationError, "no .npz files"),
    "object-npz": (lambda tmp: _npz_dir(tmp / "cal", [{"tokens": np.array([None, 1], dtype=object)}]),
                   CalibrationError, "000.npz: not a readable .npz"),
    "garbage-npz": (lambda tmp: _bytes("g.npz", b"\x00garbage")(_npz_dir(tmp / "cal", [])).parent, CalibrationError,
                    "g.npz: not a readable .npz"),
    "text-without-tokenizer": (_bytes("stories.txt", b"Once upon a time.<|endoftext|>The end."), CalibrationError,
                               "needs its tokenizer"),
    "missing-path": (lambda tmp: tmp / "nowhere", CalibrationError, "no such calibration file"),
}

PIPELINE_CASES = {
    "unknown-pass": ("calibrate,frobnicate,quantize,lower-ort", "unknown pass 'frobnicate'"),
    "unknown-recipe": ("w9a9", "unknown recipe 'w9a9'"),
    "unsupported-option-value": ("quantize{weights=3},lower-ort", "weights=3"),
    "unknown-option": ("quantize{foo=1},lower-ort", "no option 'foo'"),
    "option-type": ("calibrate,smooth{alpha=abc},quantize,lower-ort", "option 'alpha' expects float"),
    "option-range": ("calibrate,smooth{alpha=2.0},quantize,lower-ort", "alpha must be in (0, 1)"),
    "literal-option": ("quantize{mode=sideways},lower-ort", "must be one of ['static', 'dynamic'"),
    "empty-option": ("quantize{mode=},lower-ort", "has no value"),
    "unclosed-brace": ("quantize{mode=static", "unclosed '{'"),
    "bad-separator": ("calibrate,quantize;lower-ort", "expected ',' or end after 'quantize'"),
    "order": ("smooth,quantize,lower-ort", "pass 'smooth' requires ['calibrated']"),
    "duplicate-option": ("quantize{mode=static,mode=dynamic}", "option 'mode' given twice"),
}


def _out(tmp: Path) -> Path:
    return tmp / "out" / "model.onnx"


def _assert_nothing_written(tmp: Path) -> None:
    assert dir_listing(tmp / "out") == []


def _check_cli(args: list[str], capsys, tmp: Path, needle: str) -> None:
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0
    assert "error:" in err and needle in err, err
    _assert_nothing_written(tmp)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(case, tmp_path, capsys):
    make, recipe, _, exc, needle = MODEL_CASES[case]
    model = make(tmp_path)
    with pytest.raises(exc) as info:
        lowbit.compile(model, recipe, output=_out(tmp_path), progress=False)
    assert needle in str(info.value)
    _assert_nothing_written(tmp_path)
    _check_cli(["compile", str(model), "--recipe", recipe, "-o", str(_out(tmp_path))], capsys, tmp_path, needle)


@pytest.mark.parametrize("case", list(CALIB_CASES))
def test_bad_calibration(case, tmp_path, capsys):
    make, exc, needle = CALIB_CASES[case]
    model = _tiny(tmp_path)
    calib = make(tmp_path) if make else None
    with pytest.raises(exc) as info:
        lowbit.compile(model, "w8a8", calibration=calib, output=_out(tmp_path), progress=False)
    assert needle in str(info.value)
    _assert_nothing_written(tmp_path)
    args = ["compile", str(model), "--recipe", "w8a8", "-o", str(_out(tmp_path))]
    _check_cli(args + (["--calibration", str(calib)] if calib else []), capsys, tmp_path, needle)


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_bad_pipeline(case, tmp_path, capsys):
    recipe, needle = PIPELINE_CASES[case]
    model = _tiny(tmp_path)
    calib = _npz_dir(tmp_path / "cal", token_feeds(2))
    with pytest.raises(PipelineError) as info:
        lowbit.compile(model, recipe, calibration=str(calib), output=_out(tmp_path), progress=False)
    assert needle in str(info.value)
    _assert_nothing_written(tmp_path)
    _check_cli(["compile", str(model), "--recipe", recipe, "-o", str(_out(tmp_path)), "--calibration", str(calib)],
               capsys, tmp_path, needle)


def test_calibration_samples_must_be_dicts(tmp_path):
    with pytest.raises(CalibrationError, match="sample 1 is a ndarray"):
        lowbit.compile(_tiny(tmp_path), "w8a8", calibration=token_feeds(1) + [np.zeros(3)], progress=False)


def test_output_path_is_a_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(LowbitError, match="is a folder"):
        lowbit.compile(_tiny(tmp_path), DYN, output=tmp_path / "taken", progress=False)
    assert dir_listing(tmp_path / "taken") == []


def test_failed_compile_keeps_the_previous_artifact(tmp_path):
    """A failing compile never replaces or touches an artifact already at the output path."""
    out = _out(tmp_path)
    lowbit.compile(_tiny(tmp_path), DYN, output=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(PipelineError):
        lowbit.compile(_tiny(tmp_path), "quantize{weights=3}", output=out, progress=False)
    assert out.read_bytes() == before
    assert dir_listing(out.parent) == ["model.onnx"]


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_all_zero_weights_and_channels_compile_exactly(recipe, tmp_path):
    """Zero matrices, zero output columns and zero input rows are legal: no NaN/Inf, zeros stay zero."""
    w = tiny_weights()
    w["q"][0][:] = 0  # a whole linear
    w["w1"][1][:5, :] = 0  # output channels 0..4 of a gate projection ([out, in])
    w["w2"][0][:, :7] = 0  # input channels 0..6 of a down projection
    w["embed"][:, 3] = 0  # an activation channel that is zero in every sample
    res = lowbit.compile(tiny_llama(tmp_path / "zeros.onnx", w), recipe, calibration=token_feeds(3),
                         output=_out(tmp_path), progress=False)
    assert res.report["lower-ort"]["ort_integer_gemms"] == 7 * TINY.n_layers + 1
    from lowbit.ir.sessions import make_session

    feed = token_feeds(1, seq=16, seed=9)[0]
    q = make_session(_out(tmp_path)).run(None, feed)[0]
    ref = make_session(tmp_path / "zeros.onnx").run(None, feed)[0]
    assert np.all(np.isfinite(q))
    assert np.linalg.norm(q - ref) / np.linalg.norm(ref) < 0.2  # random weights: ≈0.03-0.10 with or without zeros
    inits = res.model.graph.initializers
    assert not np.any(inits["layers.0.attn.q_proj.weight_q"].const_value.numpy())
    assert not np.any(inits["layers.1.mlp.gate_proj.weight_q"].const_value.numpy()[:, :5])
    for p in res.model.graph.initializers.values():
        arr = p.const_value.numpy() if p.const_value is not None else None
        if arr is not None and arr.dtype.kind == "f":
            assert np.all(np.isfinite(arr)), p.name


def test_output_under_a_file_is_refused_before_compiling(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LowbitError, match="is a file, not a folder"):
        lowbit.compile(_tiny(tmp_path), DYN, output=tmp_path / "afile" / "sub" / "m.onnx", progress=False)
    assert (tmp_path / "afile").read_text() == "x"


def test_external_data_vanishing_after_load_is_a_lowbit_error(tmp_path):
    """Models load lazily: if the data file goes away before the weights are read, say so."""
    (tmp_path / "m").mkdir()
    model = lowbit.load_model(tiny_llama(tmp_path / "m" / "tiny.onnx", external_data=True))
    (tmp_path / "m" / "tiny.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="cannot read its data"):
        lowbit.compile(model, DYN, output=_out(tmp_path), progress=False)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["inspect", "eval", "audit"])
def test_other_commands_report_bad_models(command, tmp_path, capsys):
    bad = _mangled("truncated")(tmp_path)
    args = {"inspect": ["inspect", str(bad)],
            "eval": ["eval", str(bad), "--ppl", str(bad)],
            "audit": ["audit", str(_tiny(tmp_path)), str(bad), "--calibration", str(tmp_path)]}[command]
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "error:" in err and "truncated.onnx: cannot be parsed" in err, err
