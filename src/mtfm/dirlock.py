"""One writer per output directory: an OS advisory lock held while a command writes there.

Two ``mtfm train`` processes on one ``--out`` used to both exit 0 with interleaved logs and a
``best.json`` pointing at the other run's weights; two ``mtfm prepare`` left an unreadable
shard. :func:`hold_dir_lock` takes an exclusive ``flock`` on a lock file; a second process
asking for the same directory fails at once with :class:`DirectoryLockedError`, naming the
directory and the holder's pid. The kernel releases the lock when the holder exits, however
it exits (kill -9 included), so a stale lock cannot block the next run.

The lock file is a *sibling* of the directory (``PARENT/.NAME.lock``), not a file inside it:
``prepare --overwrite`` replaces the whole directory by a rename (:mod:`mtfm.data.aggregate`),
and a lock inside it would move away with the old directory while its holder still writes.
The file stays after the holder exits (removing it would race with a process that just opened
it); it holds the last holder's pid, host, command and start time, for the error message only.

Locks are re-entrant within a process (the CLI takes the lock before loading a source, then
the library function it calls takes it again), so library calls are protected on their own
too. Under ``torchrun`` only rank 0 locks (the ranks of one run share the directory).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class DirectoryLockedError(OSError):
    """Another process holds the lock of an output directory."""


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}
_GUARD = threading.Lock()


def lock_path(directory: str | Path) -> Path:
    """``PARENT/.NAME.lock`` for ``PARENT/NAME`` (symlinks resolved, so two spellings of one
    directory share one lock)."""
    d = Path(directory).resolve()
    return d.with_name(f".{d.name}.lock")


def _holder(fd: int) -> str:
    """What the lock file says about its holder, as text for an error message."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"pid {info['pid']} on {info.get('host', '?')} ({info.get('command', '?')}, "
            f"since {info.get('since', '?')})")


def _acquire(path: Path, directory: Path, command: str) -> int:
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DirectoryLockedError(
            f"{directory}: in use by {holder}; wait for it to finish or choose another directory "
            f"(lock file {path})") from None
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


@contextmanager
def hold_dir_lock(directory: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of ``directory`` for the ``with`` block; yield the lock file's path.

    Raises :class:`DirectoryLockedError` at once if another process holds it. ``command``
    (default: this process's command line) is recorded for the other process's message.
    """
    path = lock_path(directory)
    with _GUARD:
        held = _HELD.get(path)
        if held is not None:
            held.count += 1
        else:
            what = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
            _HELD[path] = held = _Held(_acquire(path, Path(directory), what), 1)
    try:
        yield path
    finally:
        with _GUARD:
            held.count -= 1
            if held.count == 0:
                del _HELD[path]
                os.close(held.fd)  # closing the descriptor releases the flock


def claim_output_dir(out: Path, overwrite: bool, marker: str, command: str) -> None:
    """Make ``out`` free for a command that writes a whole directory (``mtfm bench ...``, ``mtfm explain``).

    A missing or empty directory is free. A non-empty one is refused unless ``overwrite``, and even
    then only an earlier output of the same command (it holds ``marker``) is removed, never a
    directory of other files. Call it with the directory's lock held (:func:`hold_dir_lock`)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if not out.is_dir():
        return
    if not any(out.iterdir()):
        out.rmdir()
        return
    if not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace an earlier "
                              f"`{command}` output)")
    if not (out / marker).is_file():
        raise FileExistsError(f"{out}: holds files `{command}` did not write (no {marker}); --overwrite "
                              f"replaces an earlier `{command}` output only: choose another --out")
    shutil.rmtree(out)
