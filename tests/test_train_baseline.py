"""The logistic-regression baseline: same interface as MTFM, only each scenario's own features."""

from __future__ import annotations

import copy

import torch
from train_fixtures import MemoryBatches, make_batch, make_split, tiny_schema

from mtfm.baselines.logistic import LogisticRegression
from mtfm.train.config import TrainConfig
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()


def test_logits_have_one_row_per_exposure_and_one_column_per_task():
    batch = make_batch(SCHEMA, seed=0)
    out = LogisticRegression(SCHEMA)(batch)
    for spec in SCHEMA.scenarios:
        assert out.logits[spec.name].shape == (batch.scenarios[spec.name].num_rows, len(spec.tasks))


def test_the_baseline_reads_no_sequences_and_no_other_scenario():
    torch.manual_seed(0)
    model = LogisticRegression(SCHEMA)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    batch = make_batch(SCHEMA, seed=1)
    changed = copy.deepcopy(batch)
    changed.history["clicks"].features.categorical["item"].random_(0, 50)
    changed.scenarios["SMALL"].item.categorical["item"].random_(0, 50)
    big, big_changed = model(batch).logits["BIG"], model(changed).logits["BIG"]
    assert torch.equal(big, big_changed)
    assert not torch.equal(model(batch).logits["SMALL"], model(changed).logits["SMALL"])


def test_the_baseline_learns_item_effects_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    model = LogisticRegression(SCHEMA)
    result = fit(model, MemoryBatches(make_split(SCHEMA, 15, seed=1), shuffle=True, seed=0),
                 MemoryBatches(make_split(SCHEMA, 6, seed=2), shuffle=False, seed=0), SCHEMA,
                 TrainConfig(epochs=4, lr=5e-2, progress=False), tmp_path, run_config={"arch": "logistic"})
    assert result.metrics["history"][-1]["valid"]["BIG"]["ctr"]["auc"] > 0.65
