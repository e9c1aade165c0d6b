"""Bad plans, evaluations and audits (issue 17): a plan JSON with a missing key or a wrong type, ``--plot``
into a folder that does not exist, ``eval`` on slices or files that give nothing to score, tokenizers that do
not fit the model, and ``audit`` of two unrelated models.  Each: exit 2, one ``error:`` line naming the
thing, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bad_input_cases import cli_refuses, npz_dir, plan_dict, story_text, text_llama
from robust_models import matmul_model, tiny_llama, token_feeds

import lowbit
from lowbit.errors import InputError


def _edit(fn):
    def make():
        plan = plan_dict(("w",), (4, 4))
        fn(plan)
        return json.dumps(plan, allow_nan=True)
    return make


def _layer(key, value):
    return _edit(lambda p: p["layers"][0].__setitem__(key, value))


def _drop(key):
    return _edit(lambda p: p["layers"][0].pop(key))


PLAN_CASES = {
    "no-layers": (_edit(lambda p: p.pop("layers")), "has no key 'layers'"),
    "layers-not-list": (_edit(lambda p: p.__setitem__("layers", 3)), "layers must be a list, got int"),
    "layer-not-object": (_edit(lambda p: p.__setitem__("layers", [4])), "layers[0] must be an object"),
    "missing-bits": (_drop("bits"), "has no key 'bits'"),
    "missing-group": (_drop("group"), "has no key 'group'"),
    "missing-name": (_drop("name"), "layers[0] has no 'name' string"),
    "missing-shape": (_drop("shape"), ".shape must be [K, N]"),
    "bits-string": (_layer("bits", "4"), ".bits must be a whole number, got str"),
    "bits-float": (_layer("bits", 4.0), ".bits must be a whole number, got float"),
    "bits-seven": (_layer("bits", 7), ".bits must be one of [2, 3, 4, 8, 16], got 7"),
    "bits-bool": (_layer("bits", True), ".bits must be a whole number, got bool"),
    "group-twelve": (_layer("group", 12), ".group must be 0 (per channel) or a power of two >= 16"),
    "group-negative": (_layer("group", -16), ".group must be >= 0"),
    "shape-one-dim": (_layer("shape", [4]), ".shape must be [K, N]"),
    "shape-negative": (_layer("shape", [-4, 4]), ".shape must be [K, N]"),
    "shape-strings": (_layer("shape", ["4", "4"]), ".shape must be [K, N]"),
    "bytes-negative": (_layer("bytes", -1), ".bytes must be >= 0"),
    "est-error-nan": (_layer("est_error", float("nan")), ".est_error must be a finite number"),
    "est-error-text": (_layer("est_error", "big"), ".est_error must be a finite number"),
    "unknown-key": (_layer("bitz", 4), "unknown key(s) ['bitz']"),
    "split-columns-out-of-range": (_layer("split", {"columns": [9], "bits": 8, "group": 0, "bytes": 4}),
                                   "split.columns must be a list of output columns in [0, 4)"),
    "split-not-object": (_layer("split", [1]), ".split must be an object or null"),
    "target-string": (_edit(lambda p: p.__setitem__("target", "x")), "target must be a finite number"),
    "extra-not-object": (_edit(lambda p: p.__setitem__("extra", [])), "extra must be a dict"),
    "json-list": (lambda: "[1, 2]", "holds a JSON list, not an object"),
    "truncated-json": (lambda: json.dumps(plan_dict())[:40], "not a readable lowbit plan"),
    "empty-file": (lambda: "", "not a readable lowbit plan"),
    "binary": (lambda: "\x00\x01", "not a readable lowbit plan"),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_in_report(case, tmp_path, capsys):
    make, needle = PLAN_CASES[case]
    path = tmp_path / "plan.json"
    path.write_text(make())
    cli_refuses(["report", path], capsys, needle)


@pytest.mark.parametrize("case", ["missing-bits", "bits-string", "layers-not-list", "truncated-json", "shape-one-dim",
                                  "group-twelve"])
def test_bad_plan_in_assign_bits(case, tmp_path, capsys):
    make, needle = PLAN_CASES[case]
    path = tmp_path / "plan.json"
    path.write_text(make())
    model = matmul_model(tmp_path / "m.onnx", (4, 4))
    out = tmp_path / "out" / "m.onnx"
    cli_refuses(["compile", model, "--recipe", f"assign-bits{{plan={path}}},quantize-weights,lower-nbits", "-o", out],
                capsys, needle, out=out)


@pytest.mark.parametrize("plot", ["missing/p.png", "missing/deeper/p.html", "."])
def test_plot_into_missing_folder(plot, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict()))
    cli_refuses(["report", path, "--plot", tmp_path / plot], capsys, "--plot")
    assert not (tmp_path / "missing").exists()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ev")
    model, tok = text_llama(folder)
    (folder / "t.txt").write_text(story_text(6))
    return model, tok, folder


def _ev(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


EVAL_CASES = {
    "slice-past-end": (lambda f, tok: ["--ppl", f / "t.txt", "--stories", "100:200", "--tokenizer", tok],
                       "--stories 100:200 selects no story"),
    "empty-text": (lambda f, tok: ["--ppl", _ev(f, "e.txt", b""), "--tokenizer", tok], "selects no story"),
    "binary-text": (lambda f, tok: ["--ppl", _ev(f, "b.txt", b"\x00\x01" * 64), "--tokenizer", tok], "NUL bytes"),
    "latin-1-text": (lambda f, tok: ["--ppl", _ev(f, "l.txt", "caf\u00e9".encode("latin-1")), "--tokenizer", tok],
                     "is not valid utf-8"),
    "tokenizer-folder": (lambda f, tok: ["--ppl", f / "t.txt", "--tokenizer", f], "no usable tokenizer"),
    "tokenizer-too-big": (lambda f, tok: ["--ppl", f / "t.txt", "--tokenizer", tok, "--model-override"], None),
    "sts-on-causal-lm": (lambda f, tok: ["--sts", f / "t.txt", "--tokenizer", tok], "STS needs an encoder"),
    "ppl-missing": (lambda f, tok: ["--ppl", f / "none.txt", "--tokenizer", tok], "no such file"),
    "ppl-dev-zero": (lambda f, tok: ["--ppl", "/dev/zero", "--tokenizer", tok], "is a character device"),
}
del EVAL_CASES["tokenizer-too-big"]  # covered below with a model of a smaller vocabulary


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval(case, llama, capsys):
    model, tok, folder = llama
    make, needle = EVAL_CASES[case]
    cli_refuses(["eval", model, *make(folder, tok)], capsys, needle)


def test_eval_tokenizer_larger_than_the_vocabulary(llama, tmp_path, capsys):
    _, tok, folder = llama
    small = tiny_llama(tmp_path / "tiny.onnx")  # vocabulary 64, the tokenizer has 512
    cli_refuses(["eval", small, "--ppl", folder / "t.txt", "--tokenizer", tok], capsys,
                "has 512 tokens but the model's vocabulary is 64")


def test_eval_reports_real_token_counts(llama):
    model, tok, folder = llama
    res = lowbit.evaluate(model, ppl=folder / "t.txt", tokenizer=tok, stories="0:3", seq_len=16)
    assert res["stories"] == 3 and res["tokens"] > 0 and res["ppl"] > 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("au") / "tiny.onnx")


AUDIT_CASES = {
    "matmul-vs-llama": (lambda t: matmul_model(t / "mm.onnx", (4, 4)), "is not a compiled form of"),
    "other-vocabulary": (lambda t: text_llama(t / "other")[0], "is not a compiled form of"),
}


@pytest.mark.parametrize("case", list(AUDIT_CASES))
def test_audit_unrelated_models(case, tiny, tmp_path, capsys):
    make, needle = AUDIT_CASES[case]
    cal = npz_dir(tmp_path / "cal", token_feeds(2))
    cli_refuses(["audit", tiny, make(tmp_path), "--calibration", cal], capsys, needle)


def test_audit_same_interface_but_no_shared_layer(tiny, tmp_path, capsys):
    """Same inputs and outputs, but none of the float model's linears in the other: refused."""
    import onnx

    proto = onnx.load(str(tiny))
    for node in proto.graph.node:
        node.name = "renamed_" + node.name
    other = tmp_path / "renamed.onnx"
    other.write_bytes(proto.SerializeToString())
    cal = npz_dir(tmp_path / "cal", token_feeds(2))
    cli_refuses(["audit", tiny, other, "--calibration", cal], capsys, "unrelated models")


def test_evaluate_refuses_zero_pairs(tmp_path):
    with pytest.raises(InputError):
        lowbit.evaluate(tmp_path / "x.onnx", ppl=None, sts=None)
