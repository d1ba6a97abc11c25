"""The DCNv2 baseline: shapes, learning, training through the trainer, per-scenario
independence, and its cross layers against their formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import train_fixtures
from train_fixtures import MemoryBatches, make_split

from mtfm.baselines.dcnv2 import CrossLayer, DCNv2, DCNv2Config, MixCrossLayer
from mtfm.model.testing import random_batch, tiny_schema
from mtfm.train.config import TrainConfig
from mtfm.train.models import build_model
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()
SMALL = dict(cross_layers=2, deep_hidden=[16, 8], inputs={"embedding_dim": 4, "numeric_dim": 2, "sequence_dim": 8})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed: int = 0, **overrides: object) -> DCNv2:
    torch.manual_seed(seed)
    return DCNv2(SCHEMA, DCNv2Config.model_validate({**SMALL, **overrides}))


@pytest.mark.parametrize("overrides", [{}, {"cross": "mix", "low_rank": 3, "num_experts": 2},
                                       {"structure": "parallel"}, {"cross_layers": 0},
                                       {"inputs": {"embedding_dim": 4, "history_pooling": "mean"}}])
def test_logits_have_one_row_per_exposure_and_one_column_per_task(overrides):
    batch = random_batch(SCHEMA, 5, seed=0)
    out = small_model(**overrides)(batch)
    assert set(out.logits) == set(batch.scenarios)
    for spec in SCHEMA.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
        assert torch.isfinite(out.logits[spec.name]).all()


def test_config_round_trips_and_the_registry_builds_it():
    config = DCNv2Config.model_validate({**SMALL, "cross": "mix"})
    again = DCNv2Config.model_validate(config.model_dump(mode="json"))
    assert again == config
    model = build_model("dcnv2", config.model_dump(mode="json"), SCHEMA)
    assert isinstance(model, DCNv2) and model.config == config
    with pytest.raises(ValueError):
        DCNv2Config(deep_hidden=[8, 0])
    with pytest.raises(ValueError):
        DCNv2Config.model_validate({"cross": "low"})


@pytest.mark.parametrize("cross", ["full", "mix"])
def test_a_few_steps_make_the_loss_fall(cross):
    model = small_model(cross=cross, low_rank=4)
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
    model = DCNv2(schema, DCNv2Config.model_validate(SMALL))
    result = fit(model, MemoryBatches(make_split(schema, 15, seed=1), shuffle=True, seed=0),
                 MemoryBatches(make_split(schema, 6, seed=2), shuffle=False, seed=0), schema,
                 TrainConfig(epochs=4, lr=1e-2, progress=False), tmp_path, run_config={"arch": "dcnv2"})
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


def test_cross_layer_matches_its_formula_on_a_hand_example():
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, 1.0]))
    x0 = torch.tensor([[2.0, 3.0]])
    xl = torch.tensor([[1.0, -1.0]])
    # W xl + b = [1 - 2 + 0.5, 0 + 1 + 1] = [-0.5, 2]; x0 * that = [-1, 6]; + xl = [0, 5]
    assert torch.equal(layer(x0, xl), torch.tensor([[0.0, 5.0]]))
    # the first layer (xl = x0) holds the second-order crosses x0_i * x0_j
    assert torch.equal(layer(x0, x0), torch.tensor([[2.0 * (2 + 6 + 0.5) + 2, 3.0 * (-3 + 1) + 3]]))


def test_mix_cross_layer_matches_its_formula():
    torch.manual_seed(0)
    d, r, e = 5, 2, 3
    layer = MixCrossLayer(d, r, e)
    with torch.no_grad():
        layer.bias.normal_()
    x0, xl = torch.randn(4, d), torch.randn(4, d)
    gate = torch.softmax(layer.gate(xl), dim=-1)
    expected = xl.clone()
    for i in range(e):
        inner = layer.u[i].T @ torch.tanh(layer.c[i].T @ torch.tanh(layer.v[i].T @ xl.T))  # [d, n]
        expected = expected + gate[:, i:i + 1] * x0 * (inner.T + layer.bias)
    assert torch.allclose(layer(x0, xl), expected, atol=1e-6)


def test_stacked_feeds_the_cross_output_to_the_deep_network():
    model = small_model()
    sub = model.scenarios["food"]
    batch = random_batch(SCHEMA, 4, seed=3)
    x0 = sub.x0(batch)
    assert x0.shape[1] == sub.inputs.out_dim
    assert torch.allclose(sub(batch), sub.output(sub.deep(sub.cross_net(x0))))
