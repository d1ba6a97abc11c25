"""The MMoE baseline: shapes, learning, training through the trainer, per-scenario
independence, and its per-task gates."""

from __future__ import annotations

import copy

import pytest
import torch
import train_fixtures
from train_fixtures import MemoryBatches, make_split

from mtfm.baselines.mmoe import MMoEBaseline, MMoEConfig
from mtfm.model.testing import random_batch, tiny_schema
from mtfm.train.config import TrainConfig
from mtfm.train.models import build_model
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()
SMALL = dict(num_experts=3, expert_hidden=[16], expert_dim=8, tower_hidden=[8],
             inputs={"embedding_dim": 4, "numeric_dim": 2, "sequence_dim": 8})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0, **overrides: object) -> MMoEBaseline:
    torch.manual_seed(seed)
    return MMoEBaseline(SCHEMA, MMoEConfig.model_validate({**SMALL, **overrides}))


@pytest.mark.parametrize("overrides", [{}, {"expert_hidden": [], "tower_hidden": []},
                                       {"inputs": {"embedding_dim": 4, "history_pooling": "mean"}}])
def test_logits_have_one_row_per_exposure_and_one_column_per_task(overrides):
    batch = random_batch(SCHEMA, 5, seed=0)
    out = small_model(**overrides)(batch)
    assert set(out.logits) == set(batch.scenarios)
    for spec in SCHEMA.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
        assert torch.isfinite(out.logits[spec.name]).all()


def test_config_round_trips_and_the_registry_builds_it():
    config = MMoEConfig.model_validate(SMALL)
    again = MMoEConfig.model_validate(config.model_dump(mode="json"))
    assert again == config
    model = build_model("mmoe", config.model_dump(mode="json"), SCHEMA)
    assert isinstance(model, MMoEBaseline) and model.config == config
    with pytest.raises(ValueError):
        MMoEConfig(tower_hidden=[0])
    with pytest.raises(ValueError):
        MMoEConfig.model_validate({"experts": 4})


def test_a_few_steps_make_the_loss_fall():
    model = small_model()
    batch = random_batch(SCHEMA, 8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model.loss(batch, model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_model_learns_through_the_trainer(tmp_path):
    schema = train_fixtures.tiny_schema()
    torch.manual_seed(0)
    model = MMoEBaseline(schema, MMoEConfig.model_validate(SMALL))
    result = fit(model, MemoryBatches(make_split(schema, 15, seed=1), shuffle=True, seed=0),
                 MemoryBatches(make_split(schema, 6, seed=2), shuffle=False, seed=0), schema,
                 TrainConfig(epochs=4, lr=1e-2, progress=False), tmp_path, run_config={"arch": "mmoe"})
    history = result.metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["valid"]["BIG"]["ctr"]["auc"] > 0.6


def test_scenarios_share_no_parameters():
    model = small_model()
    ids = {name: {id(p) for p in sub.parameters()} for name, sub in model.scenarios.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], f"{a} and {b} share parameters"
    batch = random_batch(SCHEMA, 6, seed=2)
    changed = copy.deepcopy(batch)
    changed.scenarios["feed"].item.categorical["item_id"].random_(0, 50)
    changed.scenarios["feed"].cross.numeric["distance"].normal_()
    before, after = model(batch).logits, model(changed).logits
    assert not torch.allclose(before["feed"], after["feed"])
    for other in ("food", "coupon"):
        assert torch.equal(before[other], after[other])


def test_gates_are_per_task_and_sum_to_one():
    model = small_model()
    batch = random_batch(SCHEMA, 6, seed=4)
    for spec in SCHEMA.scenarios:
        sub = model.scenarios[spec.name]
        x = sub.x(batch)
        gates = sub.gates(x)
        assert gates.shape == (x.shape[0], len(spec.tasks), 3)
        assert (gates >= 0).all()
        assert torch.allclose(gates.sum(-1), torch.ones(x.shape[0], len(spec.tasks)))
        assert len(sub.gate) == len(spec.tasks) and len(sub.towers) == len(spec.tasks)
    # each task's gate is its own: changing task 0's gate leaves task 1's weights unchanged
    sub = model.scenarios["feed"]
    x = sub.x(batch)
    before = sub.gates(x)
    with torch.no_grad():
        sub.gate[0].weight.normal_()
    after = sub.gates(x)
    assert not torch.allclose(before[:, 0], after[:, 0])
    assert torch.equal(before[:, 1], after[:, 1])


def test_output_is_each_tower_on_its_gate_mixture_of_the_shared_experts():
    model = small_model()
    sub = model.scenarios["coupon"]
    batch = random_batch(SCHEMA, 5, seed=5)
    x = sub.x(batch)
    gates = sub.gates(x)
    experts = [e(x) for e in sub.experts]
    for k, tower in enumerate(sub.towers):
        mixed = sum(gates[:, k, i:i + 1] * experts[i] for i in range(len(experts)))
        assert torch.allclose(sub(batch)[:, k:k + 1], tower(mixed), atol=1e-6)
