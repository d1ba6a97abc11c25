"""Corrupt checkpoints (issue 11, part 2, item 5): a truncated or damaged checkpoint file is
named in the error, and --resume falls back to the previous intact checkpoint with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safety_helpers import train_args
from train_fixtures import MemoryBatches, TinyRanker, make_split, prepare_synthetic, tiny_schema, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.train.checkpoint import CheckpointManager, CorruptCheckpointError
from mtfm.train.config import TrainConfig
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()
TRAIN = make_split(SCHEMA, 12, seed=1)
VALID = make_split(SCHEMA, 4, seed=2)
CFG = TrainConfig(epochs=2, lr=1e-2, progress=False, log_every=4, checkpoint_every=4, seed=0)


class Interrupt(KeyboardInterrupt):
    """Stands for a kill between two steps."""


def _fit(run: Path, *, resume: bool = False, stop_at: int | None = None):
    def hook(state):
        if state.step == stop_at:
            raise Interrupt()

    torch.manual_seed(0)
    return fit(TinyRanker(SCHEMA), MemoryBatches(TRAIN, shuffle=True, seed=0), MemoryBatches(VALID, shuffle=False, seed=0),
               SCHEMA, CFG, run, run_config={"arch": "tiny", "model": {}, "schema": SCHEMA.model_dump(mode="json")},
               resume=resume, step_hook=hook)


def test_resume_falls_back_from_a_truncated_checkpoint_to_the_previous_one_exactly(tmp_path):
    full = _fit(tmp_path / "full")
    with pytest.raises(Interrupt):
        _fit(tmp_path / "cut", stop_at=10)
    mgr = CheckpointManager(tmp_path / "cut")
    assert [p.name for p in mgr.resume_candidates()] == ["step-00000008", "step-00000004"]
    model_file = mgr.latest() / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"cannot resume from .*step-00000008: .*step-00000008/model.safetensors: "
                                         r"100 bytes, .*checksums.json says"):
        resumed = _fit(tmp_path / "cut", resume=True)
    assert resumed.state.history == full.state.history and resumed.state.step == full.state.step
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_damaged_checkpoints_are_named_with_or_without_checksums(tmp_path):
    with pytest.raises(Interrupt):
        _fit(tmp_path, stop_at=10)
    mgr = CheckpointManager(tmp_path)
    newest, older = mgr.resume_candidates()
    optimizer = older / "optimizer.safetensors"
    raw = bytearray(optimizer.read_bytes())
    raw[-3] ^= 0xFF  # same size, other bytes
    optimizer.write_bytes(bytes(raw))
    (newest / "checksums.json").unlink()  # as written before checksums: damage shows when parsed
    rng = newest / "rng-rank0.safetensors"
    rng.write_bytes(rng.read_bytes()[:-8])
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError) as err:
        _fit(tmp_path, resume=True)
    assert "no intact checkpoint to resume from" in str(err.value)
    assert f"{rng}: unreadable (truncated or damaged?)" in str(err.value)
    assert f"{optimizer}: checksum crc32:" in str(err.value)


def test_evaluate_names_a_damaged_checkpoint(tmp_path, capsys):
    data = Path(prepare_synthetic(tmp_path / "data", users=40))
    run = tmp_path / "run"
    assert main(train_args(data, run, write_tiny_model_yaml(tmp_path / "tiny.yaml"), "--max-steps", "1")) == 0
    weights = CheckpointManager(run).latest() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"mtfm evaluate: error: {weights}: " in err and "Traceback" not in err
