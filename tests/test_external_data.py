"""External-data safety (the bug class of CVE-2024-27318/27319): a model's external data must lie
inside its folder.  Escaping locations are refused by ``load_onnx`` before any file outside the
folder is opened; a legitimate external-data model loads lazily and compiles."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from robust_models import dir_listing, tiny_llama, token_feeds

import lowbit
from lowbit.api.cli import main
from lowbit.errors import ModelLoadError
from lowbit.ir.model_io import load_onnx

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while _OPENED is a list


@pytest.fixture
def opened():
    global _OPENED
    _OPENED = []
    yield _OPENED
    _OPENED = None


@pytest.fixture
def legit(tmp_path) -> Path:
    """tiny Llama in model/, weights in model/tiny.onnx.data."""
    (tmp_path / "model").mkdir()
    return tiny_llama(tmp_path / "model" / "tiny.onnx", external_data=True)


def _relocate(model: Path, location: str) -> Path:
    """Rewrite every external-data location of ``model`` (in place) to ``location``."""
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    model.write_bytes(proto.SerializeToString())
    return model


def _secret(tmp_path: Path, legit: Path) -> Path:
    """A valid copy of the weights outside the model folder: reading it would succeed."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    secret = tmp_path / "outside" / "secret.data"
    shutil.copy(legit.with_name("tiny.onnx.data"), secret)
    return secret


def _refused(model: Path, opened: list[str], secret: Path, needle: str) -> None:
    opened.clear()  # forget the test's own setup
    with pytest.raises(ModelLoadError) as info:
        load_onnx(model)
    assert needle in str(info.value)
    assert "embed.weight" in str(info.value) or "initializer" in str(info.value)
    assert str(secret.resolve()) not in opened, "the file outside the model folder was opened"


def test_dotdot_location_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    _refused(_relocate(legit, "../outside/secret.data"), opened, secret, "outside the model's directory")


def test_absolute_location_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    _refused(_relocate(legit, str(secret.resolve())), opened, secret, "outside the model's directory")


def test_nested_dotdot_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    (legit.parent / "sub").mkdir()
    _refused(_relocate(legit, "sub/../../outside/secret.data"), opened, secret, "outside the model's directory")


def test_symlinked_data_file_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    data = legit.with_name("tiny.onnx.data")
    data.unlink()
    data.symlink_to(secret)
    _refused(legit, opened, secret, "(a symlink?)")


def test_symlinked_folder_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    (legit.parent / "weights").symlink_to(secret.parent, target_is_directory=True)
    _refused(_relocate(legit, "weights/secret.data"), opened, secret, "(a symlink?)")


def test_hard_link_is_refused(tmp_path, legit, opened):
    secret = _secret(tmp_path, legit)
    data = legit.with_name("tiny.onnx.data")
    data.unlink()
    os.link(secret, data)
    _refused(legit, opened, secret, "hard links")


@pytest.mark.parametrize("location", ["", "bad\\..\\..\\secret.data", "nul\0byte.data"])
def test_malformed_locations_are_refused(legit, location, opened):
    with pytest.raises(ModelLoadError, match="outside the model's directory"):
        load_onnx(_relocate(legit, location))


def test_missing_and_short_data_are_refused(legit):
    data = legit.with_name("tiny.onnx.data")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match="does not hold the tensor's"):
        load_onnx(legit)
    data.unlink()
    with pytest.raises(ModelLoadError, match="is missing"):
        load_onnx(legit)


def test_constant_attribute_with_escaping_data_is_refused(tmp_path, opened):
    """External data hides in node attributes too (a Constant's ``value``), not only initializers."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    value = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        value.external_data.add(key=k, value=v)
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], name="const", value=value),
                               helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    path = tmp_path / "model" / "const.onnx"
    path.write_bytes(proto.SerializeToString())
    opened.clear()
    with pytest.raises(ModelLoadError, match="attribute 'value' of node 'const'"):
        load_onnx(path)
    assert str(secret.resolve()) not in opened


def test_cli_refuses_escaping_data(tmp_path, legit, capsys):
    _secret(tmp_path, legit)
    _relocate(legit, "../outside/secret.data")
    out = tmp_path / "out" / "m.onnx"
    rc = main(["compile", str(legit), "--recipe", "w8a8-dynamic-nosmooth", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "error:" in err and "../outside/secret.data" in err
    assert dir_listing(tmp_path / "out") == []


def test_legit_external_data_loads_lazily_and_compiles(tmp_path, legit, opened):
    opened.clear()
    model = load_onnx(legit)
    weights = [v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes >= 1024]
    assert weights and all(isinstance(t, ir.ExternalTensor) for t in weights)
    assert all(t.raw is None for t in weights), "weights were read at load time"
    assert all(t.location == "tiny.onnx.data" for t in weights)

    out = tmp_path / "out" / "tiny.w8a8.onnx"
    res = lowbit.compile(legit, "w8a8", calibration=token_feeds(2), output=out, progress=False)
    assert res.report["lower-ort"]["ort_integer_gemms"] == res.report["quantize"]["linears"] == 15
    from lowbit.ir.sessions import make_session

    logits = make_session(out).run(None, token_feeds(1)[0])[0]
    assert logits.shape == (1, 12, 64) and np.all(np.isfinite(logits))
    assert str(legit.with_name("tiny.onnx.data").resolve()) in opened


def test_model_in_a_symlinked_folder_still_loads(tmp_path, legit):
    """Resolving symlinks of the model folder itself is fine: the data stays inside it."""
    (tmp_path / "alias").symlink_to(legit.parent, target_is_directory=True)
    model = load_onnx(tmp_path / "alias" / "tiny.onnx")
    assert model.graph.initializers["embed.weight"].const_value.numpy().shape == (64, 32)


def test_compile_keeps_no_replaced_float_weight_alive(tmp_path, legit):
    """Peak memory stays near the model size only if replaced weights are freed pass by pass
    (onnx-ir's graph-input reference counter once kept every weight that shape inference touched)."""
    import gc

    mine = {i.name for i in onnx.load(str(legit), load_external_data=False).graph.initializer}
    gc.collect()
    before = {id(t) for t in gc.get_objects() if isinstance(t, (ir.Tensor, ir.ExternalTensor))}
    res = lowbit.compile(legit, "w8a8", calibration=token_feeds(2), progress=False)
    live = {id(v.const_value) for v in res.model.graph.initializers.values()}
    gc.collect()
    # only this compile's weights: other tests' session-scoped fixtures may hold models of their own
    stale = [t for t in gc.get_objects() if isinstance(t, (ir.Tensor, ir.ExternalTensor)) and id(t) not in live
             and id(t) not in before and t.name in mine and str(t.name).endswith("_proj.weight")
             and t.dtype == ir.DataType.FLOAT]
    assert stale == [], f"{len(stale)} float weights still alive, e.g. {stale[0].name}"
