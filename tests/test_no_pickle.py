"""No code execution from inputs: pickles are never unpickled, whatever path they come through.

The malicious pickle below would create a marker file when unpickled; every test asserts the marker
never appears.  A static check scans lowbit's own source for unpickling calls.
"""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from robust_models import tiny_llama

import lowbit
from lowbit.api.cli import main
from lowbit.errors import LowbitError, ModelLoadError

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("compiler", "passes", "backends", "runtime", "benchmarks", "examples")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _evil_pickle(marker: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    data = pickle.dumps({"state_dict": _Payload(marker)}, protocol=protocol)
    return data


def _torch_style_zip(path: Path, marker: Path) -> Path:
    """The layout of ``torch.save``: a zip holding ``archive/data.pkl``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _evil_pickle(marker, 2))
        z.writestr("archive/version", "3\n")
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "unpickling ran attacker code"


def test_the_payload_really_works(tmp_path):
    """Guard against a vacuous suite: unpickling this payload does create the marker."""
    m = tmp_path / "control"
    pickle.loads(_evil_pickle(m))
    assert m.read_text() == "pwned"


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.pkl", "model.ckpt"])
def test_pickled_checkpoints_are_refused(tmp_path, marker, name):
    path = tmp_path / name
    path.write_bytes(_evil_pickle(marker))
    with pytest.raises(ModelLoadError, match="pickled checkpoints are not loaded"):
        lowbit.load_model(path)


def test_torch_zip_checkpoint_is_refused(tmp_path, marker):
    path = _torch_style_zip(tmp_path / "model.pt", marker)
    with pytest.raises(ModelLoadError, match="pickled checkpoints"):
        lowbit.load_model(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_renamed_to_onnx_is_refused(tmp_path, marker, protocol):
    path = tmp_path / "model.onnx"
    path.write_bytes(_evil_pickle(marker, protocol))
    with pytest.raises(ModelLoadError):
        lowbit.load_model(path)


def test_torch_zip_renamed_to_onnx_is_refused(tmp_path, marker):
    path = _torch_style_zip(tmp_path / "model.onnx", marker)
    with pytest.raises(ModelLoadError, match="not an ONNX protobuf"):
        lowbit.load_model(path)


def test_pytorch_model_bin_alone_is_refused(tmp_path, marker):
    """A pickle named like a weights file is read as raw llama2.c floats, never unpickled."""
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_evil_pickle(marker))
    with pytest.raises(ModelLoadError, match="llama2.c"):
        lowbit.load_model(path)


def _hf_folder(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64,
              "type_vocab_size": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    _torch_style_zip(folder / "model.ckpt", marker)
    return folder


def test_hf_folder_with_only_pickled_weights_is_refused(tmp_path, marker, capsys):
    folder = _hf_folder(tmp_path, marker)
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        lowbit.load_model(folder)
    out = tmp_path / "out" / "m.onnx"
    assert main(["compile", str(folder), "--recipe", "w8a8-dynamic-nosmooth", "-o", str(out)]) != 0
    assert "error:" in capsys.readouterr().err
    assert not out.parent.exists()
    assert main(["inspect", str(folder)]) != 0


def test_pickled_calibration_is_refused(tmp_path, marker):
    model = tiny_llama(tmp_path / "tiny.onnx")
    cal = tmp_path / "cal"
    cal.mkdir()
    (cal / "000.npz").write_bytes(_evil_pickle(marker))  # a pickle named .npz
    with pytest.raises(LowbitError, match="000.npz"):
        lowbit.compile(model, "w8a8", calibration=cal, progress=False)
    (cal / "000.npz").unlink()
    np.savez(cal / "001.npz", tokens=np.array([_Payload(marker)], dtype=object))  # object array inside an npz
    with pytest.raises(LowbitError, match="001.npz"):
        lowbit.compile(model, "w8a8", calibration=cal, progress=False)


def test_pickled_tokenizer_is_not_unpickled(tmp_path, marker):
    from lowbit.data.tokenizers import Llama2cTokenizer

    path = tmp_path / "tok.bin"
    path.write_bytes(_evil_pickle(marker))
    try:
        Llama2cTokenizer(path)
    except LowbitError:
        pass


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            yield node, owner, name, kwargs


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def test_source_never_unpickles():
    """No pickle/dill/joblib loads; torch.load only with weights_only=True; np.load only with allow_pickle=False."""
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")] if (ROOT / "compiler").is_dir() else []
    assert len(files) > 20
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
                       for m in mods):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports an unpickler")
        for node, owner, name, kwargs in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load" and _const(kwargs.get("weights_only")) is not True:
                bad.append(f"{where}: torch.load without weights_only=True")
            if owner in {"np", "numpy"} and name == "load" and _const(kwargs.get("allow_pickle")) is not False:
                bad.append(f"{where}: np.load without allow_pickle=False")
            if name in {"loads", "load", "Unpickler"} and owner in {"pickle", "dill", "cloudpickle", "joblib"}:
                bad.append(f"{where}: {owner}.{name}")
            if "trust_remote_code" in kwargs and _const(kwargs["trust_remote_code"]) is not False:
                bad.append(f"{where}: trust_remote_code")
            if isinstance(node.func, ast.Name) and name in {"eval", "exec"}:
                bad.append(f"{where}: {name}()")
    assert not bad, "\n".join(bad)


@pytest.mark.slow  # exports a tiny BERT through torch.export (≈20 s on 2 cores)
def test_hf_folder_with_safetensors_ignores_the_pickle_beside_it(tmp_path, marker):
    """With both weights present, only the safetensors are read: the pickle is never touched."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    folder = _hf_folder(tmp_path, marker)
    config = BertConfig(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                           if k not in ("model_type", "architectures")})
    BertModel(config).save_pretrained(tmp_path / "clean", safe_serialization=True)
    for f in (tmp_path / "clean").iterdir():
        f.rename(folder / f.name)
    (folder / "pytorch_model.bin").write_bytes(_evil_pickle(marker))  # keep the payload beside the real weights
    model = lowbit.load_model(folder)
    assert [v.name for v in model.graph.inputs][:2] == ["input_ids", "attention_mask"]
