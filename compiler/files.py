"""Reading the files a user names, safely: regular files only, bounded reads, strict text decoding.

* A FIFO, socket or device (``/dev/zero``) is refused *before* anything blocks or reads without end:
  the file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor.
* Reads are bounded (``limit`` bytes); a file over the bound is refused, naming its size.
* Text is decoded strictly; a bad byte is reported with its offset and a hint to pass ``--encoding``.
* Long text is streamed (:func:`iter_text`, :func:`iter_records`) so a 100 MB file without
  separators is never held or tokenized whole.

Every refusal is an :class:`~lowbit.errors.InputError` naming the file and what it was for.
"""

from __future__ import annotations

import codecs
import errno
import logging
import os
import stat
from pathlib import Path
from typing import Iterator

from lowbit.errors import InputError

__all__ = ["check_regular", "open_regular", "read_bytes", "read_text", "iter_text", "iter_records",
           "check_encoding", "os_error", "MAX_SMALL_FILE", "MAX_TEXT_FILE"]

logger = logging.getLogger(__name__)

MAX_SMALL_FILE = 64 << 20  # tokenizers, configs, plans, manifests
MAX_TEXT_FILE = 4 << 30  # calibration / evaluation text (streamed)
_CHUNK = 1 << 20


def os_error(exc: OSError, path, what: str) -> InputError:
    """A user-facing error for an ``OSError`` met while using ``path`` as ``what``."""
    code = exc.errno
    reason = {errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENAMETOOLONG: "the path is longer than the file system allows", errno.EISDIR: "is a folder",
              errno.ENOTDIR: "a parent in the path is not a folder", errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
              errno.ELOOP: "too many symbolic links"}.get(code, exc.strerror or str(exc))
    hint = {errno.ENOENT: "check the path", errno.EACCES: "check the file's permissions (chmod) or run as its owner",
            errno.EPERM: "check the file's permissions", errno.ENAMETOOLONG: "use a shorter path or file name",
            errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "write to a writable folder"}.get(code, "check the path and its permissions")
    return InputError(f"{what} '{path}': {reason}", hint=hint)


def check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise InputError(f"--encoding '{encoding}': unknown text encoding",
                         hint="use a Python codec name such as utf-8, utf-16, latin-1, cp1252") from None


def _refuse_kind(mode: int, path, what: str) -> None:
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} '{path}': is a folder, not a file", hint="give the path of a file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise InputError(f"{what} '{path}': is {kind}, not a regular file",
                         hint="lowbit reads only regular files; copy the data into a file first")


def check_regular(path, what: str) -> Path:
    """``path`` as a Path after checking that it is an existing, readable regular file (no blocking)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path, what) from None
    except ValueError as exc:  # embedded NUL
        raise InputError(f"{what} '{path!r}': not a valid path ({exc})") from None
    _refuse_kind(st.st_mode, path, what)
    if not os.access(path, os.R_OK):
        raise os_error(OSError(errno.EACCES, "permission denied"), path, what)
    return Path(path)


def open_regular(path, what: str):
    """Open ``path`` for binary reading; FIFOs and devices are refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise os_error(exc, path, what) from None
    except ValueError as exc:
        raise InputError(f"{what} '{path!r}': not a valid path ({exc})") from None
    try:
        _refuse_kind(os.fstat(fd).st_mode, path, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path, what: str, limit: int = MAX_SMALL_FILE) -> bytes:
    """The whole file, refused when it is larger than ``limit`` bytes."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise InputError(f"{what} '{path}': {size:,} bytes, larger than {limit:,}",
                             hint=f"is this really a {what}? lowbit refuses oversized files rather than exhaust memory")
        try:
            data = f.read(size + 1)  # read(limit) would allocate the whole limit up front
        except OSError as exc:
            raise os_error(exc, path, what) from None
    if len(data) > limit:
        raise InputError(f"{what} '{path}': larger than {limit:,} bytes",
                         hint=f"is this really a {what}? lowbit refuses oversized files rather than exhaust memory")
    return data


def _decode_error(exc: UnicodeDecodeError, offset: int, path, what: str, encoding: str, head: bytes) -> InputError:
    where = offset + exc.start
    if encoding.replace("-", "").lower() in ("utf8",) and head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        guess = "it starts with a UTF-16 byte-order mark: pass --encoding utf-16"
    elif b"\0" in head[:4096] and encoding.lower().startswith("utf") and "16" not in encoding:
        guess = "it holds NUL bytes: a binary file, or UTF-16 text (--encoding utf-16)"
    else:
        guess = "convert it to UTF-8, or pass its encoding with --encoding (e.g. latin-1, cp1252, utf-16)"
    return InputError(f"{what} '{path}': byte {where} ({exc.object[exc.start:exc.start + 1]!r}) is not valid "
                      f"{encoding}: {exc.reason}", hint=guess)


def iter_text(path, what: str, encoding: str = "utf-8", limit: int = MAX_TEXT_FILE) -> Iterator[str]:
    """Decoded text of ``path`` in chunks of about 1 MB, strictly decoded, at most ``limit`` bytes read."""
    encoding = check_encoding(encoding)
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    head = b""
    with open_regular(path, what) as f:
        while True:
            try:
                raw = f.read(_CHUNK)
            except OSError as exc:
                raise os_error(exc, path, what) from None
            if not head:
                head = raw[:4096]
                if encoding == "utf-8" and b"\0" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
                    at = head.index(b"\0")
                    raise InputError(f"{what} '{path}': holds NUL bytes (byte {at}): a binary file, "
                                     "not text", hint="give a text file, or its encoding with --encoding (utf-16?)")
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise _decode_error(exc, offset, path, what, encoding, head) from None
            offset += len(raw)
            if text:
                yield text.lstrip("\ufeff") if offset == len(raw) else text
            if not raw:
                return
            if offset > limit:
                raise InputError(f"{what} '{path}': larger than {limit:,} bytes", hint="use a smaller text file")


def read_text(path, what: str, encoding: str = "utf-8", limit: int = MAX_SMALL_FILE) -> str:
    return "".join(iter_text(path, what, encoding, limit))


def iter_records(path, what: str, separator: str, *, encoding: str = "utf-8", max_chars: int | None = None,
                 limit: int = MAX_TEXT_FILE) -> Iterator[str]:
    """Stripped, non-empty records of ``path`` split on ``separator``, streamed.

    With ``max_chars`` a record longer than that is cut (the rest is skipped, never held), so a file
    with no separator at all costs ``max_chars`` of memory, not its size.
    """
    buf: list[str] = []
    size = 0
    cut = False
    tail = ""
    for chunk in iter_text(path, what, encoding, limit):
        chunk = tail + chunk
        parts = chunk.split(separator)
        # keep a possible partial separator at the end for the next chunk
        keep = len(separator) - 1
        last = parts.pop()
        tail = last[-keep:] if keep and len(last) >= keep else last if keep else ""
        last = last[: len(last) - len(tail)]
        for piece in parts:
            if not cut:
                buf.append(piece)
            record = "".join(buf).strip()
            buf, size, cut = [], 0, False
            if record:
                yield record[:max_chars] if max_chars else record
        if not cut:
            buf.append(last)
            size += len(last)
            if max_chars is not None and size > max_chars:
                joined = "".join(buf)[: max_chars + 1]
                buf, size, cut = [joined], len(joined), True
    if not cut:
        buf.append(tail)
    record = "".join(buf).strip()
    if record:
        yield record[:max_chars] if max_chars else record
