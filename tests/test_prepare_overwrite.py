"""Atomic overwrite (issue 11, part 2, item 4): `prepare --overwrite` used to delete the old
output first, so a crash midway left nothing. Failures are injected, and one prepare is killed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safety_helpers import ENV, copy_store, files, make_store, small_world

import mtfm.data.aggregate as aggregate_mod
import mtfm.data.output as output_mod
from mtfm.data.aggregate import prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.store import MANIFEST_NAME, read_manifest


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory)


def _staging_left(data: Path) -> list[str]:
    return sorted(p.name for p in data.parent.glob(f".{data.name}.*") if p.is_dir())


@pytest.mark.parametrize("fail_in", ["write_shard", "write_manifest"])
def test_a_failed_overwrite_leaves_the_old_output_intact(store, tmp_path, monkeypatch, fail_in):
    data = copy_store(store, tmp_path)
    before = files(data)
    real = getattr(aggregate_mod, fail_in)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 or fail_in == "write_manifest":  # midway: after a first shard was written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(aggregate_mod, fail_in, failing)
    with pytest.raises(OSError, match="No space left"):
        prepare(small_world(seed=5), data, shards=3, overwrite=True)
    assert calls and files(data) == before and _staging_left(data) == []
    calls.clear()
    with pytest.raises(OSError, match="No space left"):  # a first prepare: no half-written directory either
        prepare(small_world(seed=5), tmp_path / "fresh", shards=3)
    assert not (tmp_path / "fresh").exists() and _staging_left(tmp_path / "fresh") == []


_CRASH = textwrap.dedent("""
    import sys, threading, time
    import mtfm.data.aggregate as agg
    from data_world import WorldSize, tiny_world
    real, first = agg.write_shard, threading.Lock()
    def write_then_hang(*args, **kwargs):  # the first shard is written, then every writer hangs
        if first.acquire(blocking=False):
            real(*args, **kwargs)
            print("wrote a shard", flush=True)
        time.sleep(600)
    agg.write_shard = write_then_hang
    agg.prepare(tiny_world(7, WorldSize(users=20, exposures_a=200, exposures_b=100, windows=8)), sys.argv[1],
                shards=3, overwrite=True)
""")


def test_a_prepare_killed_during_overwrite_leaves_the_old_output_and_the_next_one_cleans_up(store, tmp_path):
    data = copy_store(store, tmp_path)
    before = files(data)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CRASH, str(data)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert line == "wrote a shard", err.decode()[-2000:]
    assert files(data) == before
    assert _staging_left(data) == [f".data.prepare-{proc.pid}"]  # what the crash left
    BatchLoader(data, "train", 4, shuffle=False, seed=0)  # the old data still loads, verified
    prepare(small_world(seed=3), data, shards=1, overwrite=True)
    assert _staging_left(data) == [] and len(read_manifest(data).splits["train"].shards) == 1


def test_overwrite_swaps_with_two_renames_where_an_atomic_exchange_is_missing(store, tmp_path, monkeypatch):
    data = copy_store(store, tmp_path)
    monkeypatch.setattr(output_mod, "_exchange", lambda a, b: False)
    manifest = prepare(small_world(seed=4), data, shards=1, overwrite=True)
    assert read_manifest(data) == manifest and _staging_left(data) == []
    assert sum(b.batch_size for b in BatchLoader(data, "train", 4, shuffle=False, seed=0)) == \
        manifest.splits["train"].samples


def test_overwrite_refuses_a_directory_holding_otherfiles(store, tmp_path):
    data = copy_store(store, tmp_path)
    (data / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files `mtfm prepare` did not write \(notes.txt\)"):
        prepare(small_world(), data, overwrite=True)
    assert (data / "notes.txt").read_text() == "mine" and (data / MANIFEST_NAME).is_file()
