"""The MTGR baseline: one full-attention MTFM-architecture network per scenario (the shared baseline
contract: test_baseline_contract.py)."""

from __future__ import annotations

import pytest
import torch
from baseline_contract import ARCHS, one_thread_fixture

from mtfm.baselines.mtgr import MTGRConfig
from mtfm.model.batch_ops import restrict_batch, select_users, take_candidates
from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
small_model = ARCHS["mtgr"].model
_one_thread = one_thread_fixture()


def test_a_scenario_without_exposures_in_the_batch_gives_empty_logits():
    batch = random_batch(SCHEMA, 3, seed=3, lengths={"food": [0, 0, 0], "feed": [1, 2, 1]})
    out = small_model()(batch)
    assert out.logits["food"].shape == (0, 1)


def test_config_requires_full_attention_only():
    default = MTGRConfig()
    assert default.network.target_layers_per_block == 0 and default.network.d_model == 64
    partial = MTGRConfig.model_validate({"network": {"full_layers_per_block": 3}})
    assert partial.network.hta == "(0:3)x1"
    with pytest.raises(ValueError, match="full-attention layers only"):
        MTGRConfig.model_validate({"network": {"target_layers_per_block": 1}})


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
