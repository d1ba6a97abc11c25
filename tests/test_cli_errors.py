"""Every CLI error is a message, not a traceback (issue 11, part 2, item 6): the project's own
errors and OS errors print one line naming the path (exit status 2); anything else keeps its
traceback and asks for a bug report (exit status 1)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from safety_helpers import make_store

import mtfm.data.aggregate as aggregate_mod
from mtfm.cli import main
from mtfm.data.loader import BatchLoader


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory)


def test_evaluate_on_a_directory_without_checkpoints_is_a_message(store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--run", str(tmp_path / "empty"), "--data", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtfm evaluate: error: {tmp_path / 'empty' / 'checkpoints'}: no checkpoint")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_os_errors_are_one_line_naming_the_path(store, tmp_path, monkeypatch, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    args = ["prepare", "--source", "synthetic", "--users", "20", "--quiet", "--out"]
    assert main([*args, str(not_a_dir / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtfm prepare: error: {not_a_dir}") and err.endswith(": Not a directory")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "out" / "train"))

    monkeypatch.setattr(aggregate_mod, "write_shard", denied)
    assert main([*args, str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"mtfm prepare: error: {tmp_path / 'out' / 'train'}: Permission denied"

    def disk_full(*a, **k):  # a write() that fails names no file: the output being written is named
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(aggregate_mod, "write_shard", disk_full)
    assert main([*args, str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("mtfm prepare: error: [Errno 28] No space left on device "
                                               f"(while writing {tmp_path / 'out'})")


def test_project_errors_are_messages_and_bugs_keep_their_traceback(store, monkeypatch, capsys):
    import mtfm.train.evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "evaluate_run", lambda *a, **k: BatchLoader(store, "nope", 1, shuffle=False, seed=0))
    assert main(["evaluate", "--run", "r", "--data", str(store)]) == 2
    err = capsys.readouterr().err  # an unknown name: KeyError for callers, a message here, without quotes
    assert err.strip() == f"mtfm evaluate: error: unknown split 'nope'; {store} has ['test', 'train', 'valid']"

    def bug(*a, **k):
        return {}["missing"]

    monkeypatch.setattr(evaluate_mod, "evaluate_run", bug)
    assert main(["evaluate", "--run", "r", "--data", str(store)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'missing'" in err
    assert "internal error (KeyError): this is a bug in mtfm; please report it" in err
