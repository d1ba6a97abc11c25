"""The STAR baseline: partitioned normalisation per scenario, star layers (the shared
baseline contract: test_baseline_contract.py)."""

from __future__ import annotations

import copy

import torch
from baseline_contract import ARCHS, assert_scenarios_independent, one_thread_fixture

from mtfm.baselines.star import STAR, PartitionedNorm, StarLinear
from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
small_model = ARCHS["star"].model
_one_thread = one_thread_fixture()


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
    assert_scenarios_independent(model, batch, "coupon",
                                 lambda b: b.scenarios["coupon"].item.numeric["discount"].add_(5.0))


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
