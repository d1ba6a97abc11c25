"""Predictions -> metrics per scenario x task: masks, users, oracle, gathering, the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_fixtures import TinyRanker, make_split, tiny_schema

from mtfm.metrics import auc, task_metrics
from mtfm.train.evaluate import (
    MIN_POSITIVES_FOR_GAP,
    ScenarioPredictions,
    compute_metrics,
    format_table,
    gap_closed,
    mean_gauc,
    predict,
    row_user_ids,
)

SCHEMA = tiny_schema()
TASKS = {s.name: s.task_names for s in SCHEMA.scenarios}


def _preds():
    torch.manual_seed(0)
    model = TinyRanker(SCHEMA)
    return model, predict(model, make_split(SCHEMA, 4, seed=3), torch.device("cpu"), TASKS)


def test_every_exposure_is_scored_once_with_its_own_user_id():
    batches = make_split(SCHEMA, 4, seed=3)
    _, preds = _preds()
    for name in TASKS:
        expected_users = np.concatenate([row_user_ids(b, b.scenarios[name].offsets).numpy() for b in batches])
        np.testing.assert_array_equal(preds[name].users, expected_users)
        assert preds[name].probs.shape == (len(expected_users), len(TASKS[name]))
    b = batches[0].scenarios["BIG"]
    first = int(torch.nonzero(b.offsets[1:] > b.offsets[:-1])[0])  # first user with a BIG exposure
    assert preds["BIG"].users[0] == batches[0].user_ids[first]


def test_metrics_use_only_observed_labels_and_match_task_metrics():
    _, preds = _preds()
    metrics = compute_metrics(preds, TASKS)
    p = preds["BIG"]
    rows = p.mask[:, 1]
    assert not rows.all()  # the fixture hides some ctcvr labels
    direct = task_metrics(p.users[rows], p.labels[rows, 1], p.probs[rows, 1])
    assert metrics["BIG"]["ctcvr"]["auc"] == pytest.approx(direct.auc, abs=0)
    assert metrics["BIG"]["ctcvr"]["gauc"] == pytest.approx(direct.gauc, abs=0)
    assert metrics["BIG"]["ctcvr"]["exposures"] == int(rows.sum())
    json.dumps(metrics)  # JSON-ready (NaN turned into None)


def test_the_oracle_is_scored_on_the_same_exposures_and_only_when_known():
    _, preds = _preds()
    metrics = compute_metrics(preds, TASKS)
    p = preds["BIG"]
    assert metrics["BIG"]["ctr"]["oracle_auc"] == pytest.approx(auc(p.labels[:, 0], p.oracle[:, 0]), abs=0)
    assert metrics["BIG"]["ctr"]["oracle_auc"] > metrics["BIG"]["ctr"]["auc"]  # an untrained model is below it
    assert "oracle_auc" not in metrics["BIG"]["ctcvr"]  # the fixture has no oracle for ctcvr


def test_auc_of_pooled_predictions_is_not_the_mean_of_per_part_aucs():
    # Why predictions are gathered across ranks before AUC: two "ranks" with different
    # score scales each rank perfectly, yet the pooled ranking is poor.
    rank0 = (np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.1, 0.2]))
    rank1 = (np.array([0, 1, 0, 1]), np.array([0.8, 0.9, 0.8, 0.9]))
    per_rank = np.mean([auc(*rank0), auc(*rank1)])
    pooled = auc(np.r_[rank0[0], rank1[0]], np.r_[rank0[1], rank1[1]])
    assert per_rank == 1.0 and pooled < 0.8


def test_a_task_with_one_class_gives_none_not_nan():
    n = 4
    preds = {"S": ScenarioPredictions(np.arange(n), np.zeros((n, 1), np.float32), np.ones((n, 1), bool),
                                      np.full((n, 1), 0.3, np.float32), np.full((n, 1), np.nan, np.float32))}
    m = compute_metrics(preds, {"S": ["ctr"]})["S"]["ctr"]
    assert m["auc"] is None and m["gauc"] is None and m["users_skipped_single_class"] == n
    assert mean_gauc({"S": {"ctr": m}}) is None


def test_predict_restores_training_mode():
    model, _ = _preds()
    assert model.training


def test_table_shows_the_oracle_the_baseline_and_the_gap_closed():
    _, preds = _preds()
    metrics = compute_metrics(preds, TASKS)
    baseline = json.loads(json.dumps(metrics))
    baseline["BIG"]["ctr"]["gauc"] = metrics["BIG"]["ctr"]["gauc"] - 0.1
    table = format_table(metrics, baseline, min_positives_for_gap=1)
    lines = table.splitlines()
    assert "oracle AUC" in lines[0] and "LR GAUC" in lines[0] and "GAUC gap closed" in lines[0]
    assert len(lines) == 2 + sum(len(t) for t in TASKS.values())
    big_ctr = next(line for line in lines if line.startswith("| BIG | ctr |"))
    expected = gap_closed(metrics["BIG"]["ctr"]["gauc"], baseline["BIG"]["ctr"]["gauc"], metrics["BIG"]["ctr"]["oracle_gauc"])
    assert f"{100 * expected:.0f}%" in big_ctr


def test_gap_closed_is_not_shown_for_a_task_with_a_handful_of_positives():
    _, preds = _preds()
    metrics = compute_metrics(preds, TASKS)
    baseline = json.loads(json.dumps(metrics))
    assert metrics["BIG"]["ctr"]["positives"] < MIN_POSITIVES_FOR_GAP
    big_ctr = next(line for line in format_table(metrics, baseline).splitlines() if line.startswith("| BIG | ctr |"))
    assert f"n/a (<{MIN_POSITIVES_FOR_GAP} pos.)" in big_ctr and "%" not in big_ctr


def test_gap_closed_is_the_share_of_the_baseline_to_oracle_distance():
    assert gap_closed(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_closed(0.70, 0.70, 0.80) == 0.0
    assert gap_closed(0.7, None, 0.8) is None and gap_closed(0.7, 0.8, 0.8) is None
    assert gap_closed(0.9, 1.0, 0.95) is None  # the baseline beat the oracle by chance: no gap to close


def test_the_early_stopping_score_weights_each_task_gauc_by_its_scored_users():
    metrics = {"A": {"ctr": {"gauc": 0.8, "users_scored": 300}, "ctcvr": {"gauc": 0.4, "users_scored": 100}},
               "B": {"ctr": {"gauc": None, "users_scored": 0}}}
    assert mean_gauc(metrics) == pytest.approx((0.8 * 300 + 0.4 * 100) / 400)
