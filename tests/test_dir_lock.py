"""One writer per output directory (issue 11, part 2, item 1): two trains into one run used to
both exit 0 with interleaved logs and a best.json pointing at the other run's weights; two
prepares left an unreadable shard. Each test runs real concurrent processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safety_helpers import ENV, copy_store, files, make_store, make_synthetic, train_args, wait_for

from mtfm.cli import main
from mtfm.data.store import read_manifest
from mtfm.dirlock import hold_dir_lock, lock_path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory)


def _holder_pid(directory: Path) -> int | None:
    try:
        return json.loads(lock_path(directory).read_text()).get("pid")
    except (FileNotFoundError, ValueError):
        return None


def test_a_second_train_into_a_running_run_fails_at_once_naming_the_run_and_the_holder(synthetic, tmp_path):
    data, _, model = synthetic
    run = tmp_path / "run"
    # no step limit and no early stopping: the first run must still be training when the second starts
    long_run = train_args(data, run, model, "--max-steps", "100000", "--patience", "100000")
    first = subprocess.Popen([sys.executable, "-m", "mtfm", *long_run],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _holder_pid(run) == first.pid, "the first train takes the lock", first)
        wait_for(lambda: (run / "train_log.csv").is_file(), "the first train starts writing", first)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "mtfm", *train_args(data, run, model, "--max-steps", "2")],
                                env=ENV, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
        assert first.poll() is None  # the first is still training: the second did not wait for it
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert second.returncode == 2, second.stderr
    assert f"mtfm train: error: {run.resolve()}: in use by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and took < 120
    # The kernel dropped the killed holder's lock: the directory is usable again at once.
    with hold_dir_lock(run):
        pass


_HOLD = textwrap.dedent("""
    import sys, time
    from mtfm.dirlock import hold_dir_lock
    with hold_dir_lock(sys.argv[1], "mtfm prepare"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_prepare_into_a_directory_another_process_writes_fails_and_touches_nothing(store, tmp_path):
    data = copy_store(store, tmp_path)
    before = files(data)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(data)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    args = ["prepare", "--source", "synthetic", "--users", "30", "--out", str(data), "--overwrite", "--quiet"]
    try:
        assert holder.stdout.readline().decode().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "mtfm", *args], env=ENV, capture_output=True, text=True,
                                timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert second.returncode == 2
    assert f"{data.resolve()}: in use by pid {holder.pid}" in second.stderr and "mtfm prepare" in second.stderr
    assert files(data) == before
    assert main(args) == 0  # the holder is gone (killed): its lock went with it
    assert read_manifest(data).source["source"] == "synthetic"


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    probe = "import sys\nfrom mtfm.dirlock import hold_dir_lock\nwith hold_dir_lock(sys.argv[1]):\n    pass\n"
    with hold_dir_lock(tmp_path / "d"), hold_dir_lock(tmp_path / "d"):  # the CLI, then the library it calls
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "d")], capture_output=True, text=True)
        assert other.returncode == 1 and "DirectoryLockedError" in other.stderr
        assert f"in use by pid {os.getpid()}" in other.stderr
    assert subprocess.run([sys.executable, "-c", probe, str(tmp_path / "d")]).returncode == 0  # released
