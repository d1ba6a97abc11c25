"""Shared pieces of the run-safety tests (issue 11, part 2): a tiny prepared store to copy and
damage, two small synthetic worlds with a tiny MTFM config, and small file helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from data_world import WorldSize, tiny_world
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.data.raw import RawTables

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def small_world(seed: int = 0) -> RawTables:
    return tiny_world(seed, WorldSize(users=20, exposures_a=200, exposures_b=100, windows=8))


def make_store(tmp_path_factory) -> Path:
    """A prepared tiny world, two shards per split (tests copy it before damaging it)."""
    from mtfm.data.aggregate import prepare

    out = tmp_path_factory.mktemp("store") / "data"
    prepare(small_world(), out, shards=2)
    return out


def make_synthetic(tmp_path_factory) -> tuple[Path, Path, str]:
    """Two small synthetic worlds (other seeds: other data) and a tiny MTFM config file."""
    root = tmp_path_factory.mktemp("synthetic")
    one = prepare_synthetic(root / "one", users=60, seed=0)
    two = prepare_synthetic(root / "two", users=60, seed=1)
    return Path(one), Path(two), write_tiny_model_yaml(root / "tiny.yaml")


def train_args(data: Path, out: Path, model: str, *extra: str) -> list[str]:
    """``mtfm train`` arguments for a tiny, quiet run."""
    return ["train", "--data", str(data), "--out", str(out), "--model", model, "--quiet", "--batch-size", "8",
            "--lr", "1e-3", *extra]


def copy_store(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(store, out)
    return out


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to prove a directory was not touched)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_manifest(data: Path, edit) -> None:
    path = data / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
