"""The RankMixer baseline: shapes, learning, per-scenario independence, and its token mixing."""

from __future__ import annotations

import copy

import pytest
import torch

from mtfm.baselines.rankmixer import RankMixer, RankMixerBlock, RankMixerConfig, token_mixing
from mtfm.model.testing import random_batch, tiny_schema
from mtfm.train.models import build_model

SCHEMA = tiny_schema()
SMALL = dict(num_tokens=4, d_model=16, num_blocks=2, ffn_mult=2, tower_hidden=[8],
             inputs={"embedding_dim": 4, "numeric_dim": 2, "sequence_dim": 8})


def small_model(seed: int = 0) -> RankMixer:
    torch.manual_seed(seed)
    return RankMixer(SCHEMA, RankMixerConfig.model_validate(SMALL))


def test_logits_have_one_row_per_exposure_and_one_column_per_task():
    batch = random_batch(SCHEMA, 5, seed=0)
    out = small_model()(batch)
    assert set(out.logits) == set(batch.scenarios)
    for spec in SCHEMA.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
        assert torch.isfinite(out.logits[spec.name]).all()


def test_config_round_trips_and_the_registry_builds_it():
    config = RankMixerConfig.model_validate(SMALL)
    again = RankMixerConfig.model_validate(config.model_dump(mode="json"))
    assert again == config
    model = build_model("rankmixer", config.model_dump(mode="json"), SCHEMA)
    assert isinstance(model, RankMixer) and model.config == config
    with pytest.raises(ValueError, match="divisible"):
        RankMixerConfig(num_tokens=3, d_model=16)


def test_a_few_steps_make_the_loss_fall():
    model = small_model()
    batch = random_batch(SCHEMA, 8, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model.loss(batch, model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


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


def test_token_mixing_on_a_hand_example():
    # two tokens of width 4, two heads of width 2: output token h = head h of token 0 || head h of token 1
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0],
                       [5.0, 6.0, 7.0, 8.0]]])
    expected = torch.tensor([[[1.0, 2.0, 5.0, 6.0],
                              [3.0, 4.0, 7.0, 8.0]]])
    assert torch.equal(token_mixing(x, 2), expected)


def test_token_mixing_is_a_parameter_free_permutation_matching_its_definition():
    n, t, d = 3, 4, 8
    x = torch.randn(n, t, d)
    out = token_mixing(x, t)
    assert out.shape == (n, t, d)
    w = d // t
    for h in range(t):
        assert torch.equal(out[:, h], torch.cat([x[:, j, h * w:(h + 1) * w] for j in range(t)], dim=1))
    assert torch.equal(torch.sort(out.flatten(1)).values, torch.sort(x.flatten(1)).values)
    # a block's only parameters are its per-token FFN and its two LayerNorms: mixing adds none
    block = RankMixerBlock(RankMixerConfig(num_tokens=t, d_model=d))
    assert {name.split(".")[0] for name, _ in block.named_parameters()} == {"norm_mix", "ffn", "norm_ffn"}


def test_each_token_position_has_its_own_ffn():
    block = RankMixerBlock(RankMixerConfig(num_tokens=2, d_model=4, ffn_mult=1))
    x = torch.randn(1, 2, 4)
    y = block.ffn(x)
    with torch.no_grad():
        block.ffn.up.weight[1].zero_()  # token 1's FFN only
    z = block.ffn(x)
    assert torch.equal(y[:, 0], z[:, 0])
    assert not torch.equal(y[:, 1], z[:, 1])
