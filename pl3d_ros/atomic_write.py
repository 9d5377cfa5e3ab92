"""One atomic file write for the whole package (checkpoints, training state, engine cache).

``atomic_write(path, data)`` writes into a temp file in the same directory, fsyncs it, renames it
over ``path`` (``os.replace``) and fsyncs the directory. Same directory, so the rename never
crosses filesystems (where it would stop being atomic); fsync before the rename, so a power cut
cannot leave a renamed file whose blocks never reached the disk. A reader therefore sees either
the old file or the new one, never half of one.

A process killed (SIGKILL, OOM, power cut) between creating the temp file and the rename cannot
remove it, so temp names carry the writer's pid::

    .<target name>.<pid>.<8 random chars>.tmp

and :func:`clean_stale_temps` (run by every write, and by owners of a directory at start, e.g.
the engine cache) removes the temps whose writer is no longer alive, and any older than
:data:`STALE_AGE_S` whatever their name says (a pid may be reused; temps from another host on a
shared filesystem; temps of the unnumbered form earlier versions wrote). A temp of a live
writer younger than that is never touched, so two processes writing one file do not break each
other's writes.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
#: A temp file older than this (seconds) is stale whoever wrote it: no write of this package
#: takes an hour (the largest, a TensorRT plan of a few hundred MB, takes seconds).
STALE_AGE_S = 3600.0
#: Mode of the written file. mkstemp creates 0600; checkpoints and engines are meant to be
#: shared between the users of a robot.
DEFAULT_MODE = 0o644

# The tail after ".<target name>.": "<pid>.<random>.tmp" (this module) or "<random>.tmp"
# (tempfile.mkstemp's 8 characters, the form earlier versions of pl3d_ros wrote).
_TAIL = re.compile(r"(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS or filesystem lets a
    directory be opened or fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def _temp_target(name: str, target: str | None = None) -> tuple[str, int | None] | None:
    """(target name, writer pid or None) of a temp file name of this module, else None.

    With ``target`` only that file's temps match. Without it the shortest target wins, so
    ``.a.17.abcdefgh.tmp`` reads as a temp of ``a`` by pid 17 (not of ``a.17``).
    """
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    if target is not None:
        head = f".{target}."
        m = _TAIL.fullmatch(name[len(head):]) if name.startswith(head) else None
        return (target, int(m["pid"]) if m["pid"] else None) if m else None
    body = name[1:]
    for i, ch in enumerate(body):
        if ch == "." and i > 0:
            m = _TAIL.fullmatch(body[i + 1:])
            if m:
                return body[:i], (int(m["pid"]) if m["pid"] else None)
    return None


def _is_stale(path: Path, pid: int | None, now: float) -> bool:
    try:
        age = now - path.stat().st_mtime
    except OSError:
        return False  # already gone
    if age > STALE_AGE_S:
        return True
    return pid is not None and not _pid_alive(pid)


def clean_stale_temps(path: str | os.PathLike[str], *, target: str | None = None) -> list[Path]:
    """Remove stale temp files this module left behind; returns what was removed.

    Args:
        path: a file (its own temps are cleaned) or a directory (every temp in it is cleaned).
        target: with a directory, only the temps of this file name.

    Never raises for a missing directory or a file that vanishes meanwhile; a temp that cannot
    be removed (read-only directory) is logged and left.
    """
    p = Path(path)
    if p.is_dir():
        directory, only = p, target
    else:
        directory, only = p.parent, p.name
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    now = time.time()
    removed = []
    for entry in entries:
        parsed = _temp_target(entry.name, only)
        if parsed is None:
            continue
        temp = directory / entry.name
        if not _is_stale(temp, parsed[1], now):
            continue
        try:
            temp.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale temp file %s: %s", temp, exc)
            continue
        removed.append(temp)
    if removed:
        log.info("removed %d stale temp file(s) of an interrupted write in %s: %s", len(removed),
                 directory, ", ".join(t.name for t in removed))
    return removed


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview | Callable[[Path], None],
                 *, mode: int = DEFAULT_MODE, make_dirs: bool = True) -> Path:
    """Write ``path`` atomically (see the module docstring); returns ``path`` as a Path.

    Args:
        path: the file to create or replace.
        data: the bytes, or a function that writes the file at the temp path it is given (for
            writers that want a file name, e.g. ``safetensors.torch.save_file``).
        mode: permission bits of the new file.
        make_dirs: create the parent directory first.

    Stale temps of ``path`` (interrupted earlier writes) are removed first. On any failure,
    including KeyboardInterrupt, the temp file is removed and ``path`` is untouched; the error
    propagates (OSError for a full disk or a read-only directory).
    """
    path = Path(path)
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=TEMP_SUFFIX)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(Path(tmp))
            _fsync_file(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1  # owned by f now
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path
