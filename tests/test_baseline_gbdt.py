"""The LightGBM baseline (issue 14): its documented feature columns, history aggregates that obey
MTFM's visibility rule, and a small end-to-end run scored by the library's metric code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from mtfm.baselines.gbdt import (
    GBDTConfig,
    feature_columns,
    read_split,
    run_gbdt,
    scenario_features,
    train_task,
)
from mtfm.data.batch import JaggedBatch, SequenceBatch, realtime_expiry
from mtfm.model.testing import random_batch, tiny_schema

needs_lightgbm = pytest.mark.skipif(importlib.util.find_spec("lightgbm") is None,
                                    reason="lightgbm is not installed: pip install 'mtfm[gbdt]'")

SCHEMA = tiny_schema()
FAST = GBDTConfig(num_threads=1, early_stopping_rounds=10)  # one thread: OpenMP on busy shared cores is slow


def test_feature_columns_are_the_documented_ones():
    cols = feature_columns(SCHEMA, "feed", GBDTConfig(max_categorical_cardinality=10))
    assert [(c.name, c.categorical) for c in cols] == [
        ("user__age", True),  # vocabulary of 3 (+ OOV): categorical
        ("cross__distance", False),
        ("item__item_id", False),  # 50 ids > 10: a plain integer
        ("item__tags__len", False), ("item__tags__first", True),
        ("hist_orders__count", False), ("hist_orders__secs_since_last", False), ("hist_orders__same_item_id", False),
        ("hist_clicks__count", False), ("hist_clicks__secs_since_last", False), ("hist_clicks__same_item_id", False),
        ("rt_recent__count", False), ("rt_recent__secs_since_last", False), ("rt_recent__same_item_id", False),
    ]
    # coupon's brand declares no share: no match counts, only counts and recency per sequence type
    coupon = [c.name for c in feature_columns(SCHEMA, "coupon", GBDTConfig())]
    assert coupon[:3] == ["user__vip", "item__brand", "item__discount"]
    assert not any("same" in c for c in coupon) and len(coupon) == 3 + 2 * 3
    assert feature_columns(SCHEMA, "feed", GBDTConfig())[2].categorical  # 50 <= 1000


def test_the_feature_matrix_holds_the_stored_features():
    batch = random_batch(SCHEMA, 6, seed=1)
    for spec in SCHEMA.scenarios:
        x = scenario_features(batch, SCHEMA, spec.name)
        names = [c.name for c in feature_columns(SCHEMA, spec.name, GBDTConfig())]
        assert x.shape == (batch.scenarios[spec.name].num_rows, len(names))
    feed = batch.scenarios["feed"]
    x = scenario_features(batch, SCHEMA, "feed")
    col = {c.name: i for i, c in enumerate(feature_columns(SCHEMA, "feed", GBDTConfig()))}
    np.testing.assert_array_equal(x[:, col["item__item_id"]], feed.item.categorical["item_id"].numpy())
    np.testing.assert_array_equal(x[:, col["cross__distance"]], feed.cross.numeric["distance"].numpy())
    values, offsets = feed.item.multi["tags"]
    lengths = (offsets[1:] - offsets[:-1]).numpy()
    np.testing.assert_array_equal(x[:, col["item__tags__len"]], lengths)
    first = x[:, col["item__tags__first"]]
    assert np.isnan(first[lengths == 0]).all()
    np.testing.assert_array_equal(first[lengths > 0], values.numpy()[offsets[:-1].numpy()[lengths > 0]])


def _brute_force(batch: JaggedBatch, scenario: str) -> dict[str, list[float]]:
    """The aggregates by a per-exposure loop over the rule's definition (no expiry): every H row;
    of the R rows strictly before the exposure, the ``max_len`` latest."""
    sc = batch.scenarios[scenario]
    item = sc.item.categorical["item_id"]
    out: dict[str, list[float]] = {}
    for b in range(batch.batch_size):
        for row in range(int(sc.offsets[b]), int(sc.offsets[b + 1])):
            t_q = int(sc.timestamps[row])
            types = [(f"hist_{s.name}", batch.history[s.name], None) for s in SCHEMA.history]
            types += [(f"rt_{s.name}", batch.realtime[s.name], s.max_len) for s in SCHEMA.realtime]
            for prefix, seq, max_len in types:
                rows = list(range(int(seq.offsets[b]), int(seq.offsets[b + 1])))
                if max_len is not None:
                    rows = [k for k in rows if int(seq.timestamps[k]) < t_q][-max_len:]
                stamps = [int(seq.timestamps[k]) for k in rows]
                out.setdefault(f"{prefix}__count", []).append(len(rows))
                out.setdefault(f"{prefix}__secs_since_last", []).append(t_q - max(stamps) if stamps else math.nan)
                same = sum(int(seq.features.categorical["item_id"][k]) == int(item[row]) for k in rows)
                out.setdefault(f"{prefix}__same_item_id", []).append(same)
    return out


def test_history_aggregates_match_a_brute_force_reading_of_the_rule():
    batch = random_batch(SCHEMA, 8, seed=2)
    x = scenario_features(batch, SCHEMA, "feed")
    col = {c.name: i for i, c in enumerate(feature_columns(SCHEMA, "feed", GBDTConfig()))}
    expected = _brute_force(batch, "feed")
    assert x.shape[0] > 0 and set(expected) <= set(col)
    for name, values in expected.items():
        np.testing.assert_array_equal(x[:, col[name]], np.array(values, dtype=np.float64), err_msg=name)


def _insert_realtime(batch: JaggedBatch, user: int, ts: int, item: int) -> JaggedBatch:
    """``batch`` with one more ``recent`` action (item ``item``, no tags) of ``user`` at ``ts``,
    in time order after actions at the same time, expiry recomputed as the loader does.
    The token layout is left stale: the GBDT features never read it."""
    seq, max_len = batch.realtime["recent"], SCHEMA.realtime[0].max_len
    lo, hi = int(seq.offsets[user]), int(seq.offsets[user + 1])
    pos = lo + int((seq.timestamps[lo:hi] <= ts).sum())
    stamps = torch.cat([seq.timestamps[:pos], torch.tensor([ts]), seq.timestamps[pos:]])
    ids = seq.features.categorical["item_id"]
    values, tag_offsets = seq.features.multi["tags"]
    features = dataclasses.replace(
        seq.features,
        categorical={"item_id": torch.cat([ids[:pos], torch.tensor([item]), ids[pos:]])},
        multi={"tags": (values, torch.cat([tag_offsets[:pos + 1], tag_offsets[pos:]]))},  # an empty bag
    )
    offsets = seq.offsets.clone()
    offsets[user + 1:] += 1
    new = SequenceBatch(offsets, stamps, features, realtime_expiry(offsets, stamps, max_len))
    return dataclasses.replace(batch, realtime={"recent": new})


def test_a_realtime_action_at_or_after_the_exposure_does_not_change_its_features():
    batch = random_batch(SCHEMA, 6, seed=3)
    feed = batch.scenarios["feed"]
    user = int(torch.nonzero(feed.offsets[1:] > feed.offsets[:-1])[0])
    row = int(feed.offsets[user])  # the user's first feed exposure
    t_q, item = int(feed.timestamps[row]), int(feed.item.categorical["item_id"][row])
    before = scenario_features(batch, SCHEMA, "feed")[row]
    for ts in (t_q, t_q + 1, t_q + 1000):
        after = scenario_features(_insert_realtime(batch, user, ts, item), SCHEMA, "feed")[row]
        np.testing.assert_array_equal(after, before, err_msg=f"an action at {ts} leaked into an exposure at {t_q}")


def test_an_earlier_realtime_action_does_change_its_features():
    batch = random_batch(SCHEMA, 6, seed=3)
    feed = batch.scenarios["feed"]
    user = int(torch.nonzero(feed.offsets[1:] > feed.offsets[:-1])[0])
    row = int(feed.offsets[user])
    t_q, item = int(feed.timestamps[row]), int(feed.item.categorical["item_id"][row])
    col = {c.name: i for i, c in enumerate(feature_columns(SCHEMA, "feed", GBDTConfig()))}
    before = scenario_features(batch, SCHEMA, "feed")[row]
    after = scenario_features(_insert_realtime(batch, user, t_q - 1, item), SCHEMA, "feed")[row]
    assert after[col["rt_recent__secs_since_last"]] == 1.0  # the newest visible action, one second before
    assert after[col["rt_recent__same_item_id"]] >= 1
    assert not np.array_equal(np.nan_to_num(after, nan=-1), np.nan_to_num(before, nan=-1))
    hist = [i for name, i in col.items() if name.startswith("hist_")]
    np.testing.assert_array_equal(after[hist], before[hist])  # an R action is no H row


# ---- end to end on a small prepared synthetic world ------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """300 synthetic users, two valid and two test days (enough positives for a stable AUC)."""
    from mtfm.data.aggregate import prepare
    from mtfm.data.sources.synthetic import load_source

    out = tmp_path_factory.mktemp("gbdt") / "data"
    prepare(load_source(None, None, 300, 0, valid_days=2, test_days=2), out, shards=1)
    return out


@needs_lightgbm
def test_run_gbdt_scores_every_scenario_and_task(world, tmp_path):
    result = run_gbdt(world, FAST, seed=0, out_dir=tmp_path / "run")
    schema, _ = read_split(world, "test", FAST)
    for spec in schema.scenarios:
        for metrics in (result.valid, result.test):
            assert list(metrics[spec.name]) == spec.task_names
        for task in spec.task_names:
            assert f"{spec.name}/{task}" in result.best_iterations
    # HP ctr: the world plants user taste and a real-time same-cuisine boost the features expose
    assert result.test["HP"]["ctr"]["auc"] > 0.6 and result.valid["HP"]["ctr"]["auc"] > 0.6
    assert result.test["HP"]["ctr"]["gauc"] > 0.55
    assert result.exposures > 0 and result.train_seconds > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["HP"]["ctr"]["auc"] == result.test["HP"]["ctr"]["auc"]
    for key, rounds in result.best_iterations.items():
        scenario, task = key.split("/")
        assert (tmp_path / "run" / f"model_{scenario}_{task}.txt").is_file() == (rounds > 0)


@needs_lightgbm
def test_predictions_are_deterministic_for_a_fixed_seed(world):
    schema, train = read_split(world, "train", FAST)
    _, valid = read_split(world, "valid", FAST)
    cols = feature_columns(schema, "HP", FAST)
    runs = [train_task(train["HP"], valid["HP"], 0, cols, FAST, seed, "HP/ctr") for seed in (0, 0, 1)]
    preds = [m.predict(valid["HP"].x) for m in runs]
    assert runs[0].best_iteration > 0
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])  # bagging and feature sampling follow the seed
