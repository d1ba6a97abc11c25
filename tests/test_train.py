"""The trainer on hand-built batches and a tiny model: learning, exact resume, early stopping,
optimizers, bf16, and refusals that protect a run directory."""

from __future__ import annotations

import csv

import pytest
import torch
from train_fixtures import MemoryBatches, TinyRanker, make_split, tiny_schema

from mtfm.train.checkpoint import CheckpointError
from mtfm.train.config import TrainConfig
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()
TRAIN = make_split(SCHEMA, 15, seed=1)
VALID = make_split(SCHEMA, 6, seed=2)
BASE = dict(lr=1e-2, progress=False, log_every=4, checkpoint_every=4, seed=0)


class Interrupt(KeyboardInterrupt):
    """Stands for Ctrl-C or a kill: the run stops between two steps without saving."""


def _run(tmp, cfg: TrainConfig, *, resume=False, hook=None, init_seed=0):
    torch.manual_seed(init_seed)
    model = TinyRanker(SCHEMA)
    return fit(model, MemoryBatches(TRAIN, shuffle=True, seed=cfg.seed), MemoryBatches(VALID, shuffle=False, seed=0),
               SCHEMA, cfg, tmp, run_config={"arch": "tiny", "model": {}, "schema": SCHEMA.model_dump(mode="json")},
               resume=resume, step_hook=hook)


def _interrupt_at(step: int):
    def hook(state):
        if state.step == step:
            raise Interrupt()
    return hook


def _assert_same_run(a, b):
    assert a.state.history == b.state.history  # train loss and every valid metric, exactly
    assert a.state.step == b.state.step and a.state.best == b.state.best
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k


def test_training_learns_the_signal(tmp_path):
    result = _run(tmp_path, TrainConfig(epochs=4, **{**BASE, "lr": 3e-2}))
    history = result.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid"]["BIG"]["ctr"]["auc"] > 0.65
    assert result.metrics["status"] == "epochs" and result.metrics["steps"] == 60
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "checkpoints" / "best.json").is_file()


@pytest.mark.parametrize("stop_step", [6, 17])  # mid-epoch 1 (resumes from step 4); mid-epoch 2 (from 16)
def test_resume_after_an_interruption_mid_epoch_is_bit_identical(tmp_path, stop_step):
    cfg = TrainConfig(epochs=2, **BASE)
    full = _run(tmp_path / "full", cfg)
    with pytest.raises(Interrupt):
        _run(tmp_path / "cut", cfg, hook=_interrupt_at(stop_step))
    resumed = _run(tmp_path / "cut", cfg, resume=True, init_seed=99)  # other init: weights must come from disk
    _assert_same_run(full, resumed)
    with open(tmp_path / "cut" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if not r["select"]]  # training rows (epoch-end rows carry the selection)
    assert steps == sorted(set(steps))  # the replayed steps are not logged twice
    ends = [r for r in rows if r["select"]]
    assert [int(r["step"]) for r in ends] == [h["step"] for h in full.state.history]  # one per epoch, not twice
    assert [float(r["valid_score"]) for r in ends] == pytest.approx([h["selection_score"] for h in full.state.history])


def test_a_max_steps_stop_then_resume_equals_an_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full", TrainConfig(epochs=2, **BASE))
    first = _run(tmp_path / "cut", TrainConfig(epochs=2, max_steps=7, **BASE))
    assert first.metrics["status"] == "max_steps" and first.metrics["final_valid"] is not None
    assert first.metrics["history"] == []  # no epoch ended, nothing selected
    resumed = _run(tmp_path / "cut", TrainConfig(epochs=2, **BASE), resume=True)
    _assert_same_run(full, resumed)


def test_early_stopping_ends_the_run_after_patience_epochs_without_gain(tmp_path):
    result = _run(tmp_path, TrainConfig(epochs=5, patience=1, min_delta=1.0, **BASE))  # nothing gains 1.0 GAUC
    assert result.metrics["status"] == "early_stopping"
    assert result.metrics["epochs_completed"] == 2 and result.metrics["best"]["epoch"] == 1


def test_a_separate_embedding_optimizer_owns_exactly_the_embedding_weights(tmp_path):
    cfg = TrainConfig(epochs=1, embedding_optimizer="adagrad", embedding_lr=0.05, **BASE)
    torch.manual_seed(0)
    before = TinyRanker(SCHEMA).state_dict()
    result = _run(tmp_path, cfg)
    from mtfm.train.optim import make_optimizers

    opts = make_optimizers(result.model, cfg)
    assert isinstance(opts["embedding"], torch.optim.Adagrad) and opts["embedding"].param_groups[0]["lr"] == 0.05
    assert [p is result.model.item.weight for p in opts["embedding"].param_groups[0]["params"]] == [True]
    assert all(p is not result.model.item.weight for p in opts["dense"].param_groups[0]["params"])
    after = result.model.state_dict()
    assert not torch.equal(before["item.weight"], after["item.weight"])
    assert not torch.equal(before["heads.BIG.weight"], after["heads.BIG.weight"])


def test_bf16_autocast_trains_with_a_finite_loss(tmp_path):
    result = _run(tmp_path, TrainConfig(epochs=1, bf16=True, **BASE))
    assert torch.isfinite(torch.tensor(result.metrics["history"][0]["train_loss"]))


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    torch.manual_seed(0)
    model = TinyRanker(SCHEMA)
    with torch.no_grad():
        model.heads["BIG"].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 4"):
        fit(model, MemoryBatches(TRAIN, shuffle=False, seed=0), MemoryBatches(VALID, shuffle=False, seed=0), SCHEMA,
            TrainConfig(epochs=1, **BASE), tmp_path, run_config={"arch": "tiny"})


def test_an_existing_run_is_not_overwritten_and_resume_refuses_changed_settings(tmp_path):
    _run(tmp_path, TrainConfig(epochs=1, max_steps=3, **BASE))
    with pytest.raises(CheckpointError, match="--resume"):
        _run(tmp_path, TrainConfig(epochs=1, **BASE))
    with pytest.raises(CheckpointError, match=r"\['lr'\]"):
        _run(tmp_path, TrainConfig(epochs=1, **{**BASE, "lr": 0.5}), resume=True)


def test_each_scenario_keeps_its_own_best_epoch_and_training_runs_while_any_improves(tmp_path, monkeypatch):
    # Scripted valid GAUCs: BIG peaks at epoch 1, SMALL at epoch 2, nothing gains at epoch 3.
    script = iter([(0.70, 0.60), (0.65, 0.70), (0.60, 0.65), (0.9, 0.9)])

    def fake_valid(*args, **kwargs):
        big, small = next(script)
        task = lambda g: {"gauc": g, "users_scored": 10}
        return {"BIG": {"ctr": task(big), "ctcvr": task(big)}, "SMALL": {"ctr": task(small)}}

    monkeypatch.setattr("mtfm.train.trainer.evaluate_split", fake_valid)
    result = _run(tmp_path, TrainConfig(epochs=5, patience=1, **BASE))
    m = result.metrics
    assert m["status"] == "early_stopping" and m["epochs_completed"] == 3
    assert {s: b["epoch"] for s, b in m["best_by_scenario"].items()} == {"BIG": 1, "SMALL": 2}
    assert m["best"]["epoch"] == 1  # mean (0.70 * 20 + 0.60 * 10) / 30 beats (0.65 * 20 + 0.70 * 10) / 30

    from mtfm.train.checkpoint import CheckpointManager
    from mtfm.train.evaluate import scenario_checkpoints

    chosen = scenario_checkpoints(tmp_path, "best")
    assert chosen == {"BIG": tmp_path / "checkpoints" / "snapshot-00000015",
                      "SMALL": tmp_path / "checkpoints" / "snapshot-00000030"}
    assert set(scenario_checkpoints(tmp_path, "best-overall").values()) == {CheckpointManager(tmp_path).best()}
    assert set(scenario_checkpoints(tmp_path, "last").values()) == {CheckpointManager(tmp_path).latest()}


def test_cpu_threads_leave_a_core_to_the_loader_unless_told_otherwise(monkeypatch):
    from mtfm.train.config import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert cpu_threads(TrainConfig()) == 7
    assert cpu_threads(TrainConfig(threads=3)) == 3
    assert cpu_threads(TrainConfig(prefetch=0)) is None  # no loader thread: torch's default
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert cpu_threads(TrainConfig()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # e.g. set by torchrun for each rank
    assert cpu_threads(TrainConfig()) is None


def test_attention_biases_get_their_own_learning_rate_when_asked():
    from mtfm.model.mtfm import MTFM
    from mtfm.model.testing import tiny_config, tiny_schema as model_schema
    from mtfm.train.optim import make_optimizers

    model = MTFM(model_schema(), tiny_config(relative_time_bias=True, relative_position_bias=True))
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(("time_bias", "position_bias"))}
    assert len(biases) == 2 * model.config.num_layers
    opt = make_optimizers(model, TrainConfig(lr=1e-3, attention_bias_lr_scale=30))["dense"]
    (rest, fast) = opt.param_groups
    assert {id(p) for p in fast["params"]} == biases and fast["lr"] == pytest.approx(3e-2)
    assert rest["lr"] == 1e-3 and not biases & {id(p) for p in rest["params"]}
    assert len(make_optimizers(model, TrainConfig(lr=1e-3))["dense"].param_groups) == 1  # unchanged by default


@pytest.mark.parametrize("embedding_optimizer", ["adam", "adagrad"])
def test_sparse_embedding_updates_train_and_resume_bit_identically(tmp_path, embedding_optimizer):
    """Sparse lookups are switched on by the trainer, the tables move, and an interrupted run
    resumes exactly (SparseAdam / sparse Adagrad state round-trips through the checkpoint)."""
    cfg = TrainConfig(epochs=2, embedding_optimizer=embedding_optimizer, sparse_embedding_updates=True, **BASE)
    torch.manual_seed(0)
    before = TinyRanker(SCHEMA).state_dict()["item.weight"]
    full = _run(tmp_path / "full", cfg)
    assert full.model.item.sparse
    assert not torch.equal(before, full.model.item.weight.detach())
    with pytest.raises(Interrupt):
        _run(tmp_path / "cut", cfg, hook=_interrupt_at(6))
    resumed = _run(tmp_path / "cut", cfg, resume=True, init_seed=99)
    _assert_same_run(full, resumed)
