"""The PEPNet baseline: scenario-dependent gates, stop-gradients, gated towers (the
shared baseline contract: test_baseline_contract.py)."""

from __future__ import annotations

import torch
from baseline_contract import ARCHS, one_thread_fixture

from mtfm.baselines.pepnet import GateNU, TaskTowers
from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
small_model = ARCHS["pepnet"].model
_one_thread = one_thread_fixture()


def test_the_gates_depend_on_the_scenario():
    model = small_model()
    batch = random_batch(SCHEMA, 6, seed=2)
    parts = model.inputs(batch)["feed"]
    general = torch.cat(list(parts.values()), 1)
    with torch.no_grad():
        feed, coupon = model.domain_gate(general, "feed"), model.domain_gate(general, "coupon")
        assert feed.shape == (general.shape[0], len(model.inputs.field_dims))  # one gate per field
        assert not torch.allclose(feed, coupon)
        assert bool(((feed > 0) & (feed < 2)).all())
        # the same rows scored as another scenario with the same tasks: different logits
        assert not torch.allclose(model.scenario_logits(parts, "feed"), model.scenario_logits(parts, "coupon"))


@torch.no_grad()
def test_field_gates_scale_each_field_as_a_whole():
    model = small_model()
    general = torch.rand(3, model.inputs.out_dim) + 0.5
    ratio = model.personalised_embedding(general, "food") / general
    gates = model.domain_gate(general, "food")
    start = 0
    for j, width in enumerate(model.inputs.field_dims):
        assert torch.allclose(ratio[:, start:start + width], gates[:, j:j + 1].expand(-1, width), atol=1e-6)
        start += width
    assert start == general.shape[1]


def test_gate_inputs_stop_the_gradient_of_the_general_embedding_and_of_o_ep():
    model = small_model()
    general = torch.randn(4, model.inputs.out_dim, requires_grad=True)
    model.domain_gate(general, "food").sum().backward()
    assert general.grad is None
    assert model.scenario_embedding.weight.grad is not None
    prior = torch.randn(4, model.inputs.part_dims["user"] + model.inputs.part_dims["item"], requires_grad=True)
    o_ep = torch.randn(4, model.inputs.out_dim, requires_grad=True)
    sum(g.sum() for g in model.task_gates(prior, o_ep)).backward()
    assert o_ep.grad is None and prior.grad is not None
    # but the general embedding still learns through the gated path O_ep = delta * E
    batch = random_batch(SCHEMA, 4, seed=3)
    model.zero_grad()
    model.loss(batch, model(batch)).backward()
    assert model.inputs.embeddings.tables["item_id"].weight.grad.abs().sum() > 0


def test_gate_nu_and_task_towers_follow_their_formulas():
    torch.manual_seed(0)
    gate = GateNU(3, 5, 4, scale=2.0)
    x = torch.randn(6, 3)
    assert torch.allclose(gate(x), 2 * torch.sigmoid(gate.net[2](torch.relu(gate.net[0](x)))))
    towers = TaskTowers(3, [4, 5], dropout=0.0)
    h = torch.randn(6, 4)
    gates = [torch.rand(3, 6, 4) * 2, torch.rand(3, 6, 5) * 2]
    tasks = torch.tensor([2, 0])
    out = towers(h, gates, tasks)
    assert out.shape == (6, 2)
    for j, t in enumerate(tasks.tolist()):
        h1 = torch.relu((h * gates[0][t]) @ towers.weights[0][t].T + towers.biases[0][t]) * gates[1][t]
        ref = h1 @ towers.weights[1][t].T + towers.biases[1][t]
        assert torch.allclose(out[:, j], ref[:, 0], atol=1e-5)


def test_towers_are_per_task_name_shared_by_the_scenarios_with_that_task():
    model = small_model()
    assert model.task_names == ["ctr", "ctcvr"]
    assert model.task_columns("food").tolist() == [0]
    assert model.task_columns("coupon").tolist() == [0, 1]
    assert model.towers.weights[0].shape[0] == 2
