"""Checks at the door, before anything is loaded or computed: model sources, output paths, the folders
that pipeline options write into, and the files they read.

Every refusal names the file or option and what to do; nothing here writes anything.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from lowbit.errors import InputError, ModelLoadError
from lowbit.files import check_regular, open_regular, os_error, read_bytes

__all__ = ["check_parent", "check_model_source", "check_output", "check_instrument_dir", "check_pipeline_paths",
           "check_hf_folder"]

logger = logging.getLogger(__name__)


def check_model_source(source, what: str = "model") -> None:
    """A path source must be a readable regular file, or a Hugging Face folder with sound files."""
    if not isinstance(source, (str, os.PathLike)) or str(source) == "minilm":
        return
    path = Path(source)
    try:
        is_dir = path.is_dir()
        exists = path.exists() or path.is_symlink()
    except OSError as exc:
        raise os_error(exc, path, what) from None
    except ValueError as exc:
        raise InputError(f"{what} '{source!r}': not a valid path ({exc})") from None
    if not exists:
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno not in (2,):  # ENOENT: let the frontend say "no such file" as it always did
                raise os_error(exc, path, what) from None
        return
    if is_dir:
        check_hf_folder(path, what)
    else:
        check_regular(path, what)


def check_hf_folder(path: Path, what: str = "model") -> None:
    """config.json parses as a JSON object; every .safetensors header is sound and within the file."""
    cfg = path / "config.json"
    if cfg.exists():
        data = read_bytes(cfg, f"{what} config")
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"{cfg}: byte {exc.start} is not valid UTF-8", hint="re-download the model") from None
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                                 "truncated?", hint="re-download or re-save the model's config.json") from None
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{cfg}: holds a JSON {type(obj).__name__}, not an object",
                                 hint="re-download the model's config.json")
    for st in sorted(path.glob("*.safetensors")):
        check_safetensors(st)


def check_safetensors(path: Path) -> None:
    """The 8-byte header length, the JSON header and every tensor's byte range lie within the file."""
    with open_regular(path, "safetensors weights") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)",
                                 hint="re-download the weights")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ModelLoadError(f"{path}: header of {n} bytes does not fit the {size}-byte file (truncated?)",
                                 hint="re-download the weights")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON ({exc})",
                             hint="re-download the weights") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object", hint="re-download the weights")
    body = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ModelLoadError(f"{path}: tensor '{name}' has no valid data_offsets", hint="re-download the weights")
        if offs[1] > body:
            raise ModelLoadError(f"{path}: tensor '{name}' ends at byte {offs[1]} but the file holds {body} data "
                                 "bytes (truncated)", hint="re-download the weights")


def check_output(output) -> Path:
    """The output path: not a folder, no file where a folder must be, a name the file system accepts."""
    out = Path(output)
    try:
        if out.is_dir():
            raise InputError(f"output '{output}' is a folder", hint="give the path of the .onnx file to write")
        blocker = next((p for p in out.parents if p.exists()), None)
    except OSError as exc:
        raise os_error(exc, out, "output") from None
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"output '{output}': '{blocker}' is a file, not a folder",
                         hint="choose an output path inside a folder")
    if not out.name or out.name in (".", ".."):
        raise InputError(f"output '{output}' has no file name", hint="give the path of the .onnx file to write")
    for part in out.parts:
        if len(os.fsencode(part)) > 255:
            raise InputError(f"output '{output}': '{part[:40]}…' is {len(os.fsencode(part))} bytes, longer than a "
                             "file name may be (255)", hint="choose a shorter output name")
    return out


def check_instrument_dir(path, option: str) -> Path:
    """``--dump-ir`` / ``--reproducer`` name a folder: refuse an existing file (or a file on the way)."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise InputError(f"{option} '{path}': is a file, it must be a folder",
                             hint=f"give {option} a folder (it is created if missing)")
        blocker = next((q for q in p.parents if q.exists()), None)
    except OSError as exc:
        raise os_error(exc, p, option) from None
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"{option} '{path}': '{blocker}' is a file, not a folder", hint=f"give {option} a folder")
    return p


def check_parent(value: str, where: str) -> None:
    parent = Path(value).parent
    if not parent.is_dir():
        raise InputError(f"{where} '{value}': folder '{parent}' does not exist",
                         hint="create the folder first, or write somewhere that exists")
    if Path(value).is_dir():
        raise InputError(f"{where} '{value}': is a folder", hint="give a file path")


def check_pipeline_paths(pipeline: str) -> None:
    """Files that pass options read (``plan=``) exist and are regular; folders they write into exist."""
    from lowbit.passmanager.manager import CompileContext, PassManager
    from lowbit.passmanager.pipeline import parse_pipeline

    PassManager.from_pipeline(pipeline, CompileContext(show_progress=False))  # every pass option, before loading
    for item in parse_pipeline(pipeline):
        for key, value in item.options:
            if not isinstance(value, str) or not value:
                continue
            where = f"{item.name}{{{key}=…}}"
            if key == "save":
                check_parent(value, where)
            elif key == "plan":
                check_regular(value, where)
