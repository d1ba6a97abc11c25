"""Where ``mtfm prepare`` writes: a staging directory swapped in only once it is complete.

``prepare --overwrite`` used to delete the old output first, so a crash (or a bad input found
late) left no data at all. Now every prepare writes into a temporary sibling,
``PARENT/.NAME.prepare-<pid>``, and only when the manifest is written there is the staging
directory swapped with ``PARENT/NAME``:

* on Linux with one ``renameat2(RENAME_EXCHANGE)``: atomic, a reader sees the old directory
  or the new one, never neither;
* elsewhere (or on a filesystem without it) with two renames, old -> ``.NAME.replaced-<pid>``
  then staging -> ``NAME``; a crash between the two leaves the old data in the first.

An exception before the swap removes the staging directory; a killed process leaves it, and
the next prepare of the same directory removes it (it holds the directory's lock,
:mod:`mtfm.dirlock`, so no other prepare can be writing there). Files are not fsynced before
the swap: a store torn by a power loss is caught by the loader's size and checksum checks.

Only a directory that holds nothing but prepare's own output (``manifest.json``, the split
folders, and a ``schema.yaml`` that prepare wrote, recognised by its first line) is replaced;
anything else in it (a schema file of the user's, notes) makes ``--overwrite`` refuse, instead
of going away with the old directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtfm.data.store import MANIFEST_NAME, SPLITS

PREPARED_ENTRIES = frozenset({MANIFEST_NAME, *SPLITS})
# Files a source may have prepare write beside the manifest (RawTables.files), each known as
# prepare's own by its first line: the synthetic world's schema.yaml.
WORLD_HEADER_MARK = "# Synthetic world this schema belongs to"
PREPARED_FILES = {"schema.yaml": WORLD_HEADER_MARK}


def _prepared_entry(path: Path) -> bool:
    if path.name in PREPARED_ENTRIES:
        return True
    mark = PREPARED_FILES.get(path.name)
    if mark is None or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(mark)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work when the output would silently mix with, or destroy, other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a directory")
    if not out_dir.is_dir():
        return
    entries = sorted(out_dir.iterdir())
    if entries and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    foreign = [e.name for e in entries if not _prepared_entry(e)]
    if foreign:
        raise FileExistsError(f"{out_dir}: holds files `mtfm prepare` did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); --overwrite replaces a prepared "
                              "directory only: move them away or choose another --out")


def _siblings(out_dir: Path, kind: str) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*"))


def remove_stale_staging(out_dir: Path) -> None:
    """Remove staging directories a killed prepare of ``out_dir`` left (call with its lock held)."""
    for stale in _siblings(out_dir, "prepare"):
        shutil.rmtree(stale, ignore_errors=True)
    if out_dir.is_dir():  # the swap finished; only the removal of the old copy did not
        for stale in _siblings(out_dir, "replaced"):
            shutil.rmtree(stale, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where that is unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Put ``staging`` at ``out_dir``; the old ``out_dir`` (if any) is removed afterwards."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if _exchange(staging, out_dir):
        shutil.rmtree(staging)  # now the old directory
        return
    replaced = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
    os.rename(out_dir, replaced)
    os.rename(staging, out_dir)
    shutil.rmtree(replaced)


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out_dir``; swap it in when the block ends
    normally, remove it when the block raises (``out_dir`` is then untouched)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.prepare-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out_dir)
