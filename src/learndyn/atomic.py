"""Atomic writes and writable folders: a reader sees the old file or the new one, never half of one.

`atomic_path` writes one file through a temporary file beside it (`write_bytes`, `write_json` and
`write_jsonl` are the usual uses); `atomic_dir` writes a whole folder
(a model checkpoint, a converted model) through a temporary folder beside it, named
`.tmp-HOST-PID-XXXX` so that one left by a killed process is recognised and removed by the next
`atomic_dir` in the same parent. `check_writable` tells, before any work starts, whether a command
will be able to write its output folder. Everything created here follows the umask, like any new
file or folder (tempfile's own 0600/0700 would not).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from learndyn.errors import LearndynError, first_line

TEMP_PREFIX = ".tmp-"
FOREIGN_STALE_S = 24 * 3600  # a temporary folder of another host is assumed dead after this long


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success move it to `path`, on any error (Ctrl-C
    included) delete it. With `replace`, an existing `path` is removed first; without, an existing
    non-empty `path` makes the move fail with OSError (another process finished first).

    Temporary folders that killed processes left in the same parent are removed on entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{_host()}-{os.getpid()}-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: a checkpoint should look like any folder
        yield tmp
        if replace and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    """Write `value` as UTF-8 JSON (non-ASCII kept, unknown types as their str) atomically."""
    text = json.dumps(value, indent=indent, ensure_ascii=False, default=str)
    return write_bytes(path, (text + "\n").encode("utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write rows as JSON Lines (UTF-8, one object per line) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def sweep_stale(parent: str | Path) -> list[Path]:
    """Remove the `atomic_dir` temporary folders in `parent` whose process is gone (this host: its
    PID is not running; another host: older than a day); return what was removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None or not entry.is_dir():
            continue
        host, pid = owner
        if host == _host():
            stale = not _alive(pid)
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > FOREIGN_STALE_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Fail with one line naming `folder` unless a file can be created in it, before any work starts.

    Creates the missing folders to try, and removes the ones it created, so a later validation error
    leaves nothing behind."""
    folder = Path(folder)
    created = []
    try:
        for part in reversed([folder, *folder.parents]):
            if not part.exists():
                part.mkdir()
                created.append(part)
        fd, probe = tempfile.mkstemp(prefix=".learndyn-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LearndynError(f"cannot write to {what} {folder}: {describe_os_error(err, with_file=False)}") from None
    finally:
        for part in reversed(created):
            try:
                part.rmdir()
            except OSError:
                pass
    return folder


def describe_os_error(err: OSError, *, with_file: bool = True) -> str:
    """One line for an OSError: its reason, and the file it concerns when known."""
    reason = err.strerror or first_line(err)
    if err.errno == errno.ENOSPC and "space" not in reason.lower():
        reason = f"no space left on device ({reason})"
    if with_file and err.filename:
        return f"{err.filename}: {reason}"
    return reason


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a `.tmp-HOST-PID-XXXX` name (tempfile's XXXX never holds '-'), else None."""
    if not name.startswith(TEMP_PREFIX):
        return None
    host, sep, rest = name[len(TEMP_PREFIX):].rpartition("-")[0].rpartition("-")
    if not sep or not rest.isdigit():
        return None
    return host, int(rest)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
