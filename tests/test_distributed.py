"""`torchrun --nproc_per_node 2 -m mtfm train` on CPU (gloo): each rank reads its own shards,
ranks with unequal batch counts stay in lockstep without hanging or dropping data, and the
valid metrics are computed on the predictions of both ranks gathered together."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.data.loader import BatchLoader
from mtfm.data.store import read_manifest
from mtfm.train.checkpoint import CheckpointManager
from mtfm.train.evaluate import compute_metrics, predict
from mtfm.train.models import model_from_checkpoint

BATCH = 16


def test_two_ranks_with_unequal_shards_train_in_lockstep_and_gather_before_auc(tmp_path):
    data = prepare_synthetic(tmp_path / "data", users=150, shards=3)  # rank 0 reads 2 shards, rank 1 one
    model = write_tiny_model_yaml(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mtfm",
           "train", "--data", data, "--out", str(run), "--model", model, "--epochs", "1", "--batch-size", str(BATCH),
           "--lr", "1e-3", "--quiet"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "find_unused_parameters" not in line]
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n" + "\n".join(lines[:80]))

    m = json.loads((run / "metrics.json").read_text())
    per_rank = [BatchLoader(data, "train", BATCH, shuffle=True, seed=0, rank=r, world_size=2).num_batches(0) for r in (0, 1)]
    assert per_rank[0] != per_rank[1]
    assert m["world_size"] == 2 and m["ranks_in_sync"]
    # The ranks agree on the longer count; the shorter rank replays its last batch with zero loss.
    assert m["steps"] == max(per_rank) and m["padding_steps"] == abs(per_rank[0] - per_rank[1])
    assert m["data"]["train_samples"] == read_manifest(data).splits["train"].samples  # both ranks' shards

    # Valid metrics = one process scoring every valid exposure with the same (best = last) weights.
    model_, _, schema = model_from_checkpoint(CheckpointManager(run).best())
    tasks = {s.name: s.task_names for s in schema.scenarios}
    single = compute_metrics(predict(model_, BatchLoader(data, "valid", 64, shuffle=False, seed=0).iterate(0),
                                     torch.device("cpu"), tasks), tasks)
    gathered = m["best"]["valid"]
    for scenario, per_task in single.items():
        for task, s in per_task.items():
            assert gathered[scenario][task]["exposures"] == s["exposures"]
            for key in ("auc", "gauc", "logloss", "oracle_auc"):
                if s[key] is not None:
                    assert math.isclose(gathered[scenario][task][key], s[key], rel_tol=1e-5), (scenario, task, key)
    latest = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert {p.name for p in latest.glob("rng-rank*.safetensors")} == {"rng-rank0.safetensors", "rng-rank1.safetensors"}
