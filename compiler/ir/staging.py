"""Artifact sets written as a unit: one temporary folder beside the output, moved into place at the end.

Everything a run writes — the model, its external data, the device manifest, a saved plan, a TVM
library — is first written into ``.NAME.lowbit-HOST-PID-XXXXXXXX/`` next to the output and moved into
place only after all of it was written (and checked).  On failure, SIGINT or SIGTERM the folder is
removed; folders of runs that were killed outright (SIGKILL, power loss) carry their host and PID in
the name, and the next run in the same folder removes those whose process is gone.

The temporary name is cut so it never exceeds the file system's NAME_MAX: a legal 250-character
output name works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import secrets
import signal
import socket
import threading
from pathlib import Path

from lowbit.errors import InputError

__all__ = ["ArtifactSet", "remove_stale", "temp_prefix", "name_max"]

logger = logging.getLogger(__name__)

_TAG = ".lowbit-"
_STALE = re.compile(r"^\..*\.lowbit-(?P<host>[A-Za-z0-9.\-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$", re.S)


def _host() -> str:
    host = re.sub(r"[^A-Za-z0-9.\-]", "", socket.gethostname())[:32]
    return host or "host"


def name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def temp_prefix(name: str, limit: int = 255) -> str:
    """``.NAME.lowbit-HOST-PID-`` with NAME cut (on a UTF-8 boundary) so that the prefix plus mkdtemp's 8
    random characters fit in ``limit`` bytes."""
    tail = f"{_TAG}{_host()}-{os.getpid()}-"
    room = limit - 1 - len(tail.encode()) - 8
    cut = os.fsencode(name)[: max(room, 1)].decode("utf-8", errors="ignore") or "x"
    return f".{cut}{tail}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path) -> int:
    """Remove temporary folders in ``folder`` left by killed lowbit runs of this host; returns how many."""
    removed = 0
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
                removed += 1
                logger.info("removed %s, left by a killed lowbit run (pid %s)", entry.path, m["pid"])
    return removed


class _Terminated(BaseException):
    pass


class ArtifactSet:
    """``with ArtifactSet(out) as art:`` write into ``art.dir`` (files named as they will be beside ``out``)
    and into ``art.stage(path)`` for files that go elsewhere; ``art.commit()`` moves them all into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.dir: Path | None = None
        self._staged: list[tuple[Path, Path]] = []
        self._old_term = None

    def __enter__(self) -> "ArtifactSet":
        parent = self.path.parent
        name = self.path.name
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from lowbit.files import os_error

            raise os_error(exc, parent, "output folder") from None
        limit = name_max(parent)
        if len(os.fsencode(name)) > limit:
            raise InputError(f"output '{self.path}': the file name is {len(os.fsencode(name))} bytes, longer than "
                             f"this file system allows ({limit})", hint="choose a shorter output name")
        remove_stale(parent)
        prefix = temp_prefix(name, limit)
        try:
            # the name is recorded *before* the folder exists, and any exception from here on (a KeyboardInterrupt
            # included) goes through __exit__, which removes it. Signals are not blocked: a blocked SIGINT is
            # taken by another thread and raised here at some later bytecode, possibly inside the caller's body
            for _ in range(100):
                self.dir = parent / f"{prefix}{secrets.token_hex(4)}"
                try:
                    os.mkdir(self.dir, 0o700)
                    break
                except FileExistsError:
                    continue
                except OSError as exc:
                    self.dir = None
                    from lowbit.files import os_error

                    raise os_error(exc, parent, "output folder") from None
            self._install_sigterm()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        old = signal.getsignal(signal.SIGTERM)
        if old in (signal.SIG_DFL, None):
            def _raise(signum, frame):
                raise _Terminated(signum)

            # recorded before the handler is set: signal.signal runs pending handlers, and a KeyboardInterrupt
            # raised there must still find the old handler to restore in __exit__
            self._old_term = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _raise)

    def stage(self, final: str | os.PathLike) -> Path:
        """A temporary path inside the set for a file (or folder) that belongs at ``final``."""
        final = Path(final)
        slot = self.dir / f".extra{len(self._staged)}"
        slot.mkdir()
        self._staged.append((slot / final.name, final))
        return slot / final.name

    def commit(self) -> list[Path]:
        """Move the staged files first, then this folder's files (the main output last)."""
        moved = []
        for tmp, final in self._staged:
            if not tmp.exists():
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.is_dir():
                final.mkdir(parents=True, exist_ok=True)
                for f in sorted(tmp.iterdir()):
                    moved.append(_move(f, final / f.name))
            else:
                moved.append(_move(tmp, final))
        files = sorted((f for f in self.dir.iterdir() if not f.name.startswith(".extra")),
                       key=lambda p: p.name == self.path.name)
        for f in files:
            moved.append(_move(f, self.path.parent / f.name))
        return moved

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.dir is not None:
                _remove_tree(self.dir)
        finally:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
        if exc_type is _Terminated:
            raise SystemExit(143)


def _remove_tree(folder: Path) -> None:
    """``rmtree`` that finishes even when a KeyboardInterrupt lands inside it (a signal taken by another thread is
    raised in this one at any later bytecode); the interrupt is raised again once the folder is gone."""
    interrupted = None
    for _ in range(5):
        try:
            shutil.rmtree(folder, ignore_errors=True)
            break
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the folder is removed
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _move(src: Path, dst: Path) -> Path:
    try:
        os.replace(src, dst)
    except OSError:  # another file system: copy, then rename inside the destination folder
        tmp = dst.with_name(f".{dst.name[:200]}.lowbit-move")
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return dst
