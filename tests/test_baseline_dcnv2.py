"""The DCNv2 baseline: its cross layers against their formulas (the shared
baseline contract: test_baseline_contract.py)."""

from __future__ import annotations

import torch
from baseline_contract import ARCHS, one_thread_fixture

from mtfm.baselines.dcnv2 import CrossLayer, MixCrossLayer
from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
small_model = ARCHS["dcnv2"].model
_one_thread = one_thread_fixture()


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
