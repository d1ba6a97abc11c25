"""torchrun with 2 CPU processes (gloo): unequal shards, no hang, no lost data, gathered AUC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _torchrun(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "find_unused_parameters" not in line]
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" + "\n".join(lines[:80]))
    return proc


def test_two_ranks_with_unequal_batches_train_in_lockstep_and_gather_before_auc(tmp_path):
    _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)], cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    m = report["metrics"]
    assert report["world_size"] == 2 and m["world_size"] == 2
    assert report["same_weights_on_all_ranks"]
    # 15 train batches dealt 8 / 7: 8 agreed steps per epoch, rank 1 replays once with zero loss.
    assert m["steps"] == 16 and m["padding_steps"] == 2
    assert [h["padding_steps"] for h in m["history"]] == [1, 1]
    # Every valid exposure of both ranks is scored, and the gathered metrics are those of one
    # process scoring all valid batches with the same weights.
    last = m["history"][-1]["valid"]
    for scenario, tasks in report["single_process_valid"].items():
        assert last[scenario]["ctr"]["exposures"] == report["valid_exposures"][scenario]
        for task, single in tasks.items():
            for key in ("auc", "gauc", "logloss", "oracle_auc"):
                if single.get(key) is not None:
                    assert last[scenario][task][key] == pytest.approx(single[key], rel=1e-6), (scenario, task, key)
    ckpt = tmp_path / "run" / "checkpoints"
    latest = ckpt / json.loads((ckpt / "latest.json").read_text())["checkpoint"]
    assert {p.name for p in latest.glob("rng-rank*.safetensors")} == {"rng-rank0.safetensors", "rng-rank1.safetensors"}
