"""The MTGR baseline: one full-attention MTFM-architecture network per scenario."""

from __future__ import annotations

import copy

import pytest
import torch

from mtfm.baselines.mtgr import MTGR, MTGRConfig
from mtfm.model.batch_ops import restrict_batch, select_users, take_candidates
from mtfm.model.testing import random_batch, tiny_config, tiny_schema
from mtfm.train.models import build_model

SCHEMA = tiny_schema()
NETWORK = tiny_config(blocks=1, target_layers_per_block=0, full_layers_per_block=2)


def small_model(seed: int = 0) -> MTGR:
    torch.manual_seed(seed)
    return MTGR(SCHEMA, MTGRConfig(network=NETWORK))


def test_logits_have_one_row_per_exposure_and_one_column_per_task():
    batch = random_batch(SCHEMA, 5, seed=0)
    out = small_model()(batch)
    assert set(out.logits) == set(batch.scenarios)
    for spec in SCHEMA.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))
        assert torch.isfinite(out.logits[spec.name]).all()


def test_a_scenario_without_exposures_in_the_batch_gives_empty_logits():
    batch = random_batch(SCHEMA, 3, seed=3, lengths={"food": [0, 0, 0], "feed": [1, 2, 1]})
    out = small_model()(batch)
    assert out.logits["food"].shape == (0, 1)


def test_config_round_trips_and_requires_full_attention_only():
    config = MTGRConfig(network=NETWORK)
    assert MTGRConfig.model_validate(config.model_dump(mode="json")) == config
    model = build_model("mtgr", config.model_dump(mode="json"), SCHEMA)
    assert isinstance(model, MTGR) and model.config == config
    default = MTGRConfig()
    assert default.network.target_layers_per_block == 0 and default.network.d_model == 64
    partial = MTGRConfig.model_validate({"network": {"full_layers_per_block": 3}})
    assert partial.network.hta == "(0:3)x1"
    with pytest.raises(ValueError, match="full-attention layers only"):
        MTGRConfig.model_validate({"network": {"target_layers_per_block": 1}})


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


@pytest.mark.parametrize("scenario", ["feed", "coupon"])
def test_same_logits_on_the_multi_scenario_batch_and_on_its_own_scenario(scenario):
    model = small_model()
    batch = random_batch(SCHEMA, 6, seed=4)
    full = model(batch).logits[scenario]
    own = model(restrict_batch(batch, [scenario])).logits[scenario]
    assert torch.allclose(full, own, atol=1e-6)
    assert torch.allclose(model.scenarios[scenario](batch), full, atol=1e-6)


def test_a_candidate_does_not_change_when_another_exposure_of_its_user_is_removed():
    model = small_model()
    batch = random_batch(SCHEMA, 4, seed=5, lengths={"feed": [3, 2, 3, 1]})
    logits = model(batch).logits["feed"]
    user, first = 2, 5  # user 2's feed rows are 5, 6, 7
    one = select_users(batch, [user])
    kept = torch.tensor([0, 2])  # drop its middle exposure (and its other scenarios' exposures)
    alone = model(take_candidates(one, "feed", kept)).logits["feed"]
    assert torch.allclose(alone, logits[first + kept], atol=1e-6)
