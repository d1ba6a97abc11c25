"""The contract every baseline obeys (:mod:`baseline_contract`), checked for each arch: output shapes,
config round-trip through the registry and rejection of bad values, a few steps make the loss fall,
learning through the trainer, and, for the archs with one network per scenario, scenarios that share
nothing."""

from __future__ import annotations

import pytest
import train_fixtures
from baseline_contract import (
    ARCHS,
    SCHEMA,
    assert_config_rejects,
    assert_config_round_trips,
    assert_learns_through_the_trainer,
    assert_loss_falls,
    assert_no_shared_parameters,
    assert_output_shapes,
    assert_scenarios_independent,
    one_thread_fixture,
)

from mtfm.data.batch import JaggedBatch
from mtfm.model.testing import random_batch

_one_thread = one_thread_fixture()

MEAN_POOLING = {"inputs": {"embedding_dim": 4, "history_pooling": "mean"}}
SHAPE_CASES = [
    ("dcnv2", {}), ("dcnv2", {"cross": "mix", "low_rank": 3, "num_experts": 2}), ("dcnv2", {"structure": "parallel"}),
    ("dcnv2", {"cross_layers": 0}), ("dcnv2", MEAN_POOLING),
    ("mmoe", {}), ("mmoe", {"expert_hidden": [], "tower_hidden": []}), ("mmoe", MEAN_POOLING),
    ("rankmixer", {}), ("mtgr", {}), ("onetrans", {}),
    ("star", {}), ("star", {"aux_hidden": []}), ("star", {"star_hidden": [8]}), ("star", MEAN_POOLING),
    ("pepnet", {}), ("pepnet", {"tower_hidden": [8]}), ("pepnet", {"epnet_gates": "element"}), ("pepnet", MEAN_POOLING),
]
LOSS_CASES = [("dcnv2", {"cross": "full", "low_rank": 4}), ("dcnv2", {"cross": "mix", "low_rank": 4}),
              *((name, {}) for name in ARCHS if name != "dcnv2")]
PER_SCENARIO = [name for name, arch in ARCHS.items() if arch.per_scenario]


def test_every_arch_is_covered():
    assert {name for name, _ in SHAPE_CASES} == {name for name, _ in LOSS_CASES} == set(ARCHS)
    assert PER_SCENARIO == ["dcnv2", "mmoe", "rankmixer", "mtgr", "onetrans"]


@pytest.mark.parametrize("arch, overrides", SHAPE_CASES)
def test_logits_have_one_row_per_exposure_and_one_column_per_task(arch, overrides):
    model = ARCHS[arch].model(**overrides)
    for seed in (0, 1):
        batch = random_batch(SCHEMA, 5, seed=seed)
        for training in (True, False):
            model.train(training)
            assert_output_shapes(model, SCHEMA, batch)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_round_trips_and_the_registry_builds_it(arch):
    spec = ARCHS[arch]
    assert_config_round_trips(arch, spec.config(**spec.round_trip), spec.model_class)


@pytest.mark.parametrize("arch, bad, match", [
    ("dcnv2", {"deep_hidden": [8, 0]}, None), ("dcnv2", {"cross": "low"}, None),
    ("mmoe", {"tower_hidden": [0]}, None), ("mmoe", {"experts": 4}, None),
    ("rankmixer", {"num_tokens": 3, "d_model": 16}, "divisible"),
    ("star", {"star_hidden": [8, 0]}, None), ("star", {"star_hidden": []}, None),
    ("pepnet", {"tower_hidden": [8, 0]}, None), ("pepnet", {"gate_scale": 0}, None),
])
def test_the_config_rejects_bad_values(arch, bad, match):
    assert_config_rejects(ARCHS[arch].config_class, bad, match)


@pytest.mark.parametrize("arch, overrides", LOSS_CASES)
def test_a_few_steps_make_the_loss_fall(arch, overrides):
    spec = ARCHS[arch]
    model = spec.model(**overrides).train()
    batch = random_batch(SCHEMA, spec.loss_rows, seed=spec.loss_seed)
    assert_loss_falls(model, batch, spec.loss_steps, spec.loss_lr, spec.loss_factor)


@pytest.mark.parametrize("arch", ["dcnv2", "mmoe"])
def test_the_model_learns_through_the_trainer(arch, tmp_path):
    schema = train_fixtures.tiny_schema()
    assert_learns_through_the_trainer(ARCHS[arch].model(schema=schema), schema, arch, tmp_path)


def _change_feed_item_and_cross(batch: JaggedBatch) -> None:
    batch.scenarios["feed"].item.categorical["item_id"].random_(0, 50)
    batch.scenarios["feed"].cross.numeric["distance"].normal_()


@pytest.mark.parametrize("arch", PER_SCENARIO)
def test_scenarios_share_no_parameters(arch):
    model = ARCHS[arch].model()
    assert_no_shared_parameters(model)
    assert_scenarios_independent(model, random_batch(SCHEMA, 6, seed=2), "feed", _change_feed_item_and_cross)
