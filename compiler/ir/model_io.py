"""Reading and writing ONNX models safely.

* Models load lazily through ``onnx_ir``: external data stays on disk until a pass touches it, so a
  model over 2 GB is never forced into one protobuf.
* External-data locations must stay inside the model's directory (no ``..``, no absolute path,
  no symlink leading out): the class of bug behind CVE-2024-27318/27319.
* Writes are atomic: the model (and its external data) is written into a temporary directory
  beside the output and renamed into place, so a failed compile never leaves a half-written file.
* Every model written carries ONNX IR version 10: ORT 1.31 refuses IR > 13 and onnx 1.23
  writes 14 by default.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import onnx_ir as ir

from lowbit.errors import ModelLoadError

__all__ = ["load_onnx", "save_onnx", "write_onnx", "atomic_output", "IR_VERSION", "EXTERNAL_DATA_THRESHOLD"]

logger = logging.getLogger(__name__)

IR_VERSION = 10
# Above this many bytes of initializers, weights are written to an external data file.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def _check_external_location(tensor: ir.ExternalTensor, model_path: Path, where: str) -> None:
    """Refuse external data outside the model's folder, missing, or shorter than the tensor needs."""
    base = model_path.parent.resolve()
    location = str(tensor.location)
    what = f"{model_path}: {where} '{tensor.name}'"
    if (not location or "\0" in location or "\\" in location or os.path.isabs(location)
            or location.startswith("/") or ".." in Path(location).parts):
        raise ModelLoadError(
            f"{what} points to external data '{location}' outside the model's directory",
            hint="external data must be a relative path inside the model's folder; re-export the model",
        )
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise ModelLoadError(
            f"{what}: external data '{location}' resolves to '{target}', outside the model's directory (a symlink?)",
            hint="copy the data file into the model's folder instead of linking it",
        )
    if not target.is_file():
        raise ModelLoadError(
            f"{what}: external data file '{location}' is missing",
            hint="keep the .onnx file and its data file in the same folder",
        )
    if target.stat().st_nlink > 1:
        raise ModelLoadError(
            f"{what}: external data file '{location}' has {target.stat().st_nlink} hard links; a hard link can "
            "smuggle a file from outside the model's folder", hint="copy the data file instead of hard-linking it")
    offset, length, size = tensor.offset or 0, tensor.length, target.stat().st_size
    if offset < 0 or (length is not None and (length < 0 or length != tensor.nbytes)) or offset + tensor.nbytes > size:
        raise ModelLoadError(
            f"{what}: external data '{location}' (offset {offset}, length {length}) does not hold the tensor's "
            f"{tensor.nbytes} bytes (the file has {size})",
            hint="the data file is truncated or belongs to another model; re-export it",
        )


def _external_tensors(model: ir.Model):
    """(tensor, where) for every external tensor: initializers and tensor attributes, in every graph and function."""
    graphs = [model.graph, *model.graph.subgraphs()]
    for g in graphs:
        for value in g.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value, "initializer"
    nodes = [n for g in graphs for n in g] + [n for f in model.functions.values() for n in f.all_nodes()]
    for node in nodes:
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            tensors = [attr.value] if attr.type == ir.AttributeType.TENSOR else (
                list(attr.value) if attr.type == ir.AttributeType.TENSORS else [])
            for t in tensors:
                if isinstance(t, ir.ExternalTensor):
                    yield t, f"attribute '{attr.name}' of node '{node.name or node.op_type}'"


def load_onnx(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into onnx_ir, lazily and safely."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file", hint="check the model path")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ModelLoadError(f"{path}: the file is empty", hint="re-export or re-download the model")
    if head.startswith((b"\x89HDF", b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05", b"GGUF")):
        raise ModelLoadError(
            f"{path}: this is not an ONNX protobuf (looks like an archive, pickle or GGUF file)",
            hint="export the model to ONNX first, or pass a llama2.c .bin / Hugging Face folder",
        )
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf DecodeError, onnx errors: all mean "not a readable model"
        raise ModelLoadError(
            f"{path}: cannot be parsed as an ONNX model ({type(exc).__name__}: {exc})",
            hint="the file may be truncated or corrupted; re-export or re-download it",
        ) from exc
    if model.graph is None or (not model.graph.outputs):
        raise ModelLoadError(f"{path}: the ONNX model has no graph outputs", hint="is this really a model file?")
    for tensor, where in _external_tensors(model):
        _check_external_location(tensor, path, where)
    _check_inline_tensors(model, path)
    return model


def _check_inline_tensors(model: ir.Model, path: Path) -> None:
    """Refuse undefined values, names that are not text, and inline tensors whose data does not match their shape."""
    graphs = [model.graph, *model.graph.subgraphs()]
    top_inputs = set(model.graph.inputs)
    for node in model.graph:  # subgraphs may read outer-scope values; the main graph may not
        for value in node.inputs:
            if (value is not None and value.producer() is None and value not in top_inputs
                    and not value.is_initializer()):
                raise ModelLoadError(f"{path}: node '{node.name}' ({node.op_type}) reads '{value.name}', which no "
                                     "node, input or initializer defines", hint="the file is corrupted or incomplete")
    for g in graphs:
        for node in g:
            if not isinstance(node.op_type, str) or not isinstance(node.domain, str):
                raise ModelLoadError(f"{path}: node '{node.name!r}' has an op type or domain that is not text "
                                     f"({node.op_type!r}, {node.domain!r})", hint="the file is corrupted")
        for value in g.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            try:
                tensor.numpy()  # inline data: a view, no copy
            except Exception as exc:  # size/shape mismatch, unknown dtype
                raise ModelLoadError(f"{path}: initializer '{value.name}' (shape {tensor.shape}, {tensor.dtype}) "
                                     f"does not hold matching data ({exc})", hint="the file is corrupted") from exc


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on success move every file in it next to ``path``.

    The main file (named like ``path``) is moved last so that a reader never sees it before its data
    file.  On any failure, SIGINT or SIGTERM the folder is removed; folders left by killed runs are
    removed by the next run (see :mod:`lowbit.ir.staging`).
    """
    from lowbit.ir.staging import ArtifactSet

    with ArtifactSet(path) as art:
        yield art.dir
        art.commit()


def write_onnx(model: ir.Model, target: Path, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``target`` (inside a staging folder: not atomic by itself), IR version 10.

    ``external_data=None`` chooses: weights go to ``<name>.data`` when they exceed 1 GiB.
    """
    model.ir_version = IR_VERSION
    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:  # every tensor, wherever it lives now, goes into the new data file
        ir.save(model, target, external_data=target.name + ".data")
    else:
        # weights still in the input's external data file must be written into the output,
        # or the artifact would silently depend on the input's files
        ir.external_data.load_to_model(model)
        ir.save(model, target)
    return target


def save_onnx(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically, with IR version 10.

    ``external_data=None`` chooses: weights go to ``<name>.data`` when they exceed 1 GiB.
    """
    path = Path(path)
    with atomic_output(path) as tmp:
        write_onnx(model, tmp / path.name, external_data=external_data)
    logger.info("wrote %s", path)
    return path
