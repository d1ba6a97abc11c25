"""The MMoE baseline: its per-task gates (the shared baseline contract:
test_baseline_contract.py)."""

from __future__ import annotations

import torch
from baseline_contract import ARCHS, one_thread_fixture

from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
small_model = ARCHS["mmoe"].model
_one_thread = one_thread_fixture()


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
