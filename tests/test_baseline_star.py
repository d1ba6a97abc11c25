"""The STAR baseline: shapes, learning, partitioned normalisation per scenario, star layers."""

from __future__ import annotations

import copy

import pytest
import torch

from mtfm.baselines.star import STAR, PartitionedNorm, STARConfig, StarLinear
from mtfm.model.testing import random_batch, tiny_schema
from mtfm.train.models import build_model

SCHEMA = tiny_schema()
SMALL = dict(star_hidden=[16, 8], aux_hidden=[8], scenario_dim=4,
             inputs={"embedding_dim": 4, "numeric_dim": 2, "sequence_dim": 8})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: intra-op threads only add synchronisation (20x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(seed: int = 0, **overrides: object) -> STAR:
    torch.manual_seed(seed)
    return STAR(SCHEMA, STARConfig.model_validate({**SMALL, **overrides}))


@pytest.mark.parametrize("overrides", [{}, {"aux_hidden": []}, {"star_hidden": [8]},
                                       {"inputs": {"embedding_dim": 4, "history_pooling": "mean"}}])
def test_logits_have_one_row_per_exposure_and_one_column_per_task(overrides):
    batch = random_batch(SCHEMA, 5, seed=0)
    model = small_model(**overrides)
    for training in (True, False):
        model.train(training)
        out = model(batch)
        assert set(out.logits) == set(batch.scenarios)
        for spec in SCHEMA.scenarios:
            assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
            assert torch.isfinite(out.logits[spec.name]).all()


def test_config_round_trips_and_the_registry_builds_it():
    config = STARConfig.model_validate(SMALL)
    assert STARConfig.model_validate(config.model_dump(mode="json")) == config
    model = build_model("star", config.model_dump(mode="json"), SCHEMA)
    assert isinstance(model, STAR) and model.config == config
    with pytest.raises(ValueError):
        STARConfig(star_hidden=[8, 0])
    with pytest.raises(ValueError):
        STARConfig(star_hidden=[])


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
    assert losses[-1] < 0.5 * losses[0]


def _stats_after_training_forward(model: STAR, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        model(batch)
    return model.norm.running_mean.clone(), model.norm.running_var.clone()


def test_partitioned_norm_keeps_running_statistics_per_scenario():
    model = small_model()
    batch = random_batch(SCHEMA, 8, seed=2)
    changed = copy.deepcopy(batch)
    food = changed.scenarios["food"]
    assert food.num_rows > 1
    food.item.numeric["price"].mul_(3.0).add_(1.0)
    food.item.categorical["item_id"].random_(0, 50)
    mean, var = _stats_after_training_forward(model, batch)
    mean2, var2 = _stats_after_training_forward(model, changed)
    a = model.scenario_index["food"]
    for s, i in model.scenario_index.items():
        if i != a:  # the other scenarios' statistics do not see food's rows
            assert torch.equal(mean[i], mean2[i]) and torch.equal(var[i], var2[i]), s
    assert not torch.allclose(mean[a], mean2[a]) and not torch.allclose(var[a], var2[a])
    # and a forward moves every scenario's statistics away from the initial ones by its own rows only
    only_food = random_batch(SCHEMA, 6, seed=3, lengths={"feed": [0] * 6, "coupon": [0] * 6, "food": [2] * 6})
    mean3, _ = _stats_after_training_forward(model, only_food)
    assert torch.equal(mean3[model.scenario_index["feed"]], torch.zeros_like(mean3[0]))
    assert not torch.equal(mean3[a], torch.zeros_like(mean3[a]))


def test_partitioned_norm_is_batch_norm_per_partition_with_combined_affine():
    torch.manual_seed(0)
    norm = PartitionedNorm(2, 5, momentum=0.5, eps=1e-5)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(7, 5) * 3 + 1
    out = norm(x, 1)
    ref = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    ref = ref * (norm.gamma * norm.scenario_gamma[1]) + norm.beta + norm.scenario_beta[1]
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(norm.running_mean[1], 0.5 * x.mean(0))
    assert torch.allclose(norm.running_var[1], 0.5 + 0.5 * x.var(0, unbiased=True))
    assert torch.equal(norm.running_mean[0], torch.zeros(5))
    norm.eval()  # evaluation: scenario 1's moving statistics, row by row
    mean, var = norm.running_mean[1], norm.running_var[1]
    ref = (x[:1] - mean) / torch.sqrt(var + 1e-5)
    ref = ref * (norm.gamma * norm.scenario_gamma[1]) + norm.beta + norm.scenario_beta[1]
    assert torch.allclose(norm(x[:1], 1), ref, atol=1e-5)
    before = norm.running_mean.clone()
    norm(x, 0)
    assert torch.equal(norm.running_mean, before)


def test_evaluation_scores_each_exposure_on_its_own():
    """In eval mode PN reads the moving statistics: a scenario's logits do not depend on the other
    scenarios' rows (in training they do not either, but they do depend on the scenario's own batch)."""
    model = small_model()
    train_batch = random_batch(SCHEMA, 8, seed=4)
    _ = model(train_batch)  # move the statistics
    model.eval()
    batch = random_batch(SCHEMA, 6, seed=5)
    changed = copy.deepcopy(batch)
    changed.scenarios["coupon"].item.numeric["discount"].add_(5.0)
    with torch.no_grad():
        a, b = model(batch).logits, model(changed).logits
    assert torch.equal(a["feed"], b["feed"]) and torch.equal(a["food"], b["food"])
    assert not torch.allclose(a["coupon"], b["coupon"])


def test_star_linear_multiplies_shared_and_scenario_weights():
    torch.manual_seed(0)
    layer = StarLinear(3, 4, 2)
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x, 0), layer(x, 2))  # scenario parts start as the identity
    with torch.no_grad():
        layer.scenario_weight.normal_()
        layer.scenario_bias.normal_()
    ref = x @ (layer.weight * layer.scenario_weight[2]).T + layer.bias + layer.scenario_bias[2]
    assert torch.allclose(layer(x, 2), ref, atol=1e-6)
    assert not torch.allclose(layer(x, 0), layer(x, 2))


def test_only_the_scenarios_own_partitions_get_gradients():
    model = small_model()
    batch = random_batch(SCHEMA, 6, seed=6, lengths={"feed": [0] * 6, "coupon": [0] * 6, "food": [2] * 6})
    model.loss(batch, model(batch)).backward()
    food = model.scenario_index["food"]
    for param in (model.norm.scenario_gamma, model.star[0].scenario_weight, model.star_out.scenario_bias):
        others = [i for i in range(3) if i != food]
        assert param.grad[food].abs().sum() > 0
        assert param.grad[others].abs().sum() == 0
