"""Checkpoints: exact round trip of weights, optimizer moments and RNG; atomic publication."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mtfm.train.checkpoint as ckpt_mod
from mtfm.train.checkpoint import CheckpointError, CheckpointManager, atomic_write_text, load_model_weights


class Tied(nn.Module):
    """A model with a shared (tied) weight and an embedding, as real recommenders have."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 10, bias=False)
        self.proj.weight = self.emb.weight  # tied
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids)).sum() + self.proj(self.emb(ids)).sum()


def _trained(steps: int = 3) -> tuple[Tied, dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = Tied()
    opts = {"dense": torch.optim.Adam(model.head.parameters(), lr=0.1),
            "embedding": torch.optim.Adagrad([model.emb.weight], lr=0.1)}
    for _ in range(steps):
        model(torch.randint(0, 10, (6,))).backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
    return model, opts


def _save(mgr: CheckpointManager, step: int, model: nn.Module, opts) -> None:
    mgr.save(step=step, model=model, optimizers=opts, state={"step": step}, config={"arch": "tied"})


def test_round_trip_restores_weights_optimizer_moments_and_rng_exactly(tmp_path):
    model, opts = _trained()
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 3, model, opts)
    expected_draw = torch.rand(5)  # what the generator gives right after the checkpoint

    torch.manual_seed(123)
    fresh = Tied()
    fresh_opts = {"dense": torch.optim.Adam(fresh.head.parameters(), lr=0.1),
                  "embedding": torch.optim.Adagrad([fresh.emb.weight], lr=0.1)}
    state = mgr.load(mgr.latest(), model=fresh, optimizers=fresh_opts)

    assert state["step"] == 3 and state["world_size"] == 1
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert fresh.proj.weight is fresh.emb.weight  # the tie survives loading
    for name in opts:
        a, b = opts[name].state_dict(), fresh_opts[name].state_dict()
        assert a["param_groups"] == b["param_groups"]
        for pid in a["state"]:
            for key, value in a["state"][pid].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][key])), (name, pid, key)
    assert torch.equal(torch.rand(5), expected_draw)


def test_interrupted_write_leaves_the_previous_checkpoint_and_pointer_intact(tmp_path, monkeypatch):
    model, opts = _trained()
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, model, opts)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(mgr, 2, model, opts)
    assert mgr.latest().name == "step-00000001"
    assert not (mgr.root / "step-00000002").exists()
    assert (mgr.root / ".tmp-step-00000002").exists()  # the half-written one stays hidden

    monkeypatch.undo()
    _save(mgr, 2, model, opts)
    assert mgr.latest().name == "step-00000002"
    assert not (mgr.root / ".tmp-step-00000002").exists()
    load_model_weights(mgr.latest(), Tied())


def test_only_the_last_checkpoints_are_kept_and_snapshots_live_while_a_pointer_needs_them(tmp_path):
    model, opts = _trained(1)
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        _save(mgr, step, model, opts)
    snap = lambda step, **pointers: mgr.save_snapshot(step=step, model=model, config={"arch": "tied"}, pointers=pointers)
    snap(2, **{"best": {"score": 0.7}, "best-A": {"score": 0.6}})
    snap(4, best={"score": 0.8})
    dirs = lambda: sorted(p.name for p in mgr.root.iterdir() if p.is_dir())
    assert dirs() == ["snapshot-00000002", "snapshot-00000004", "step-00000003", "step-00000004"]
    assert mgr.snapshot("best-A").name == "snapshot-00000002" and mgr.best().name == "snapshot-00000004"
    assert json.loads((mgr.best() / "best.info.json").read_text()) == {"score": 0.8}
    snap(5, **{"best-A": {"score": 0.9}})  # nothing points at step 2 any more
    assert dirs() == ["snapshot-00000004", "snapshot-00000005", "step-00000003", "step-00000004"]


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, opts = _trained(1)
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 5, model, opts)
    with torch.no_grad():
        model.head.bias.fill_(42.0)
    _save(mgr, 5, model, opts)
    fresh = Tied()
    load_model_weights(mgr.latest(), fresh)
    assert float(fresh.head.bias.detach()) == 42.0


def test_resuming_with_another_world_size_is_refused(tmp_path):
    model, opts = _trained(1)
    _save(CheckpointManager(tmp_path), 1, model, opts)
    other = CheckpointManager(tmp_path, world_size=2)
    with pytest.raises(CheckpointError, match="same number"):
        other.load(other.latest(), model=model, optimizers=opts)


def test_loading_into_a_model_of_another_shape_names_the_file(tmp_path):
    model, opts = _trained(1)
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, model, opts)
    wrong = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_weights(mgr.latest(), wrong)


def test_a_pointer_to_a_missing_checkpoint_is_an_error(tmp_path):
    model, opts = _trained(1)
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, model, opts)
    atomic_write_text(mgr.root / "latest.json", json.dumps({"checkpoint": "step-00000099"}))
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.latest()
