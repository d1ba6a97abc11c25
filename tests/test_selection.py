"""Model selection (``--select`` / ``select:``): the grammar, weighted scores, the trainer's
choice of best epoch under each metric, the schema check and the resume refusal."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from train_fixtures import MemoryBatches, TinyRanker, make_split, tiny_schema

from mtfm.train.checkpoint import CheckpointError
from mtfm.train.config import TrainConfig, train_config_from_dict
from mtfm.train.selection import ScenarioSelection, Selection, SelectionError, parse_selection, weighted_score
from mtfm.train.trainer import fit

SCHEMA = tiny_schema()  # BIG: ctr, ctcvr; SMALL: ctr
TRAIN = make_split(SCHEMA, 3, seed=1)
VALID = make_split(SCHEMA, 2, seed=2)
BASE = dict(lr=1e-2, progress=False, log_every=4, seed=0, patience=None)


# ---- grammar ----------------------------------------------------------------------------------


def test_the_grammar_parses_a_global_metric_and_per_scenario_overrides():
    assert Selection() == parse_selection("gauc") and str(Selection()) == "gauc"
    sel = parse_selection(["auc", "SQS=gauc@ctr+ctcvr, HP@ctr", "PHF=logloss"])
    assert sel.metric == "auc"
    assert sel.scenarios == {"SQS": ScenarioSelection(metric="gauc", tasks=("ctr", "ctcvr")),
                             "HP": ScenarioSelection(tasks=("ctr",)), "PHF": ScenarioSelection(metric="logloss")}
    assert str(sel) == "auc,SQS=gauc@ctr+ctcvr,HP@ctr,PHF=logloss"
    assert parse_selection(str(sel)) == sel  # the text round-trips
    assert parse_selection("SQS=auc").metric == "gauc"  # overrides only: the global default stays
    assert sel.metric_of("SQS") == "gauc" and sel.metric_of("HP") == "auc" and sel.metric_of("XX") == "auc"
    assert sel.rule("best-SQS") == "gauc@ctr+ctcvr" and sel.rule("best-PHF") == "logloss" and sel.rule("best") == str(sel)


def test_the_training_config_takes_the_text_or_a_mapping_and_round_trips_through_json():
    by_text = train_config_from_dict({"select": "logloss,BIG=auc@ctr"})
    by_map = train_config_from_dict({"select": {"metric": "logloss", "scenarios": {"BIG": {"metric": "auc", "tasks": ["ctr"]}}}})
    assert by_text == by_map and TrainConfig().select == Selection()
    assert TrainConfig.model_validate(json.loads(by_text.model_dump_json())) == by_text  # what a checkpoint stores


@pytest.mark.parametrize("text, names", [
    ("", ["empty"]),
    ("acu", ["'acu'", "neither a metric"]),
    ("HP=acu", ["'HP=acu'", "unknown metric 'acu'", "gauc, auc, logloss"]),
    ("HP=", ["'HP='", "unknown metric ''"]),
    ("=auc", ["'=auc'", "no scenario name"]),
    ("@ctr", ["'@ctr'", "no scenario name"]),
    ("HP@ctr+", ["'HP@ctr+'", "empty task name"]),
    ("HP=auc@", ["'HP=auc@'", "empty task name"]),
    ("HP@ctr+ctr", ["'HP@ctr+ctr'", "named twice"]),
    ("auc,gauc", ["'auc' and 'gauc'"]),
    ("HP=auc,HP@ctr", ["'HP' is given twice"]),
])
def test_bad_grammar_is_an_error_naming_the_bad_part(text, names):
    with pytest.raises(SelectionError) as err:
        parse_selection(text)
    for name in names:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="select"):  # the YAML field says the same, naming the field
        train_config_from_dict({"select": text})


def test_unknown_scenarios_and_tasks_are_refused_naming_them_and_the_valid_ones():
    with pytest.raises(SelectionError, match=r"unknown scenario 'HP'.*\['BIG', 'SMALL'\]"):
        parse_selection("HP=auc").check(SCHEMA)
    with pytest.raises(SelectionError, match=r"'SMALL' has no task\(s\) \['ctcvr'\].*\['ctr'\]"):
        parse_selection("auc,SMALL@ctr+ctcvr").check(SCHEMA)
    parse_selection("logloss,BIG=auc@ctcvr,SMALL@ctr").check(SCHEMA)


def test_training_with_an_unknown_scenario_fails_before_any_work(tmp_path):
    with pytest.raises(SelectionError, match="unknown scenario 'SQS'"):
        _run(tmp_path / "run", TrainConfig(epochs=1, select="SQS=auc", **BASE))
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- weighted scores ---------------------------------------------------------------------------


def _m(gauc=None, users=0, auc=None, positives=0, logloss=None, exposures=0):
    return {"gauc": gauc, "users_scored": users, "auc": auc, "positives": positives, "logloss": logloss,
            "exposures": exposures}


def test_a_scenario_with_a_handful_of_users_cannot_dominate():
    metrics = {"BIG": {"ctr": _m(0.70, 1000, 0.75, 400, 0.20, 10_000)},
               "TINY": {"ctr": _m(1.00, 2, 1.00, 1, 0.01, 5)}}
    sel = Selection()
    assert sel.scores(metrics)["best"] == pytest.approx((0.70 * 1000 + 1.0 * 2) / 1002)  # not the plain mean 0.85
    assert parse_selection("auc").scores(metrics)["best"] == pytest.approx((0.75 * 400 + 1.0) / 401)
    assert parse_selection("logloss").scores(metrics)["best"] == pytest.approx(-(0.20 * 10_000 + 0.01 * 5) / 10_005)
    scores = parse_selection("gauc,TINY=logloss").scores(metrics)
    assert scores["best-TINY"] == pytest.approx(-0.01) and scores["best-BIG"] == pytest.approx(0.70)
    assert scores["best"] == sel.scores(metrics)["best"]  # `best` keeps the global metric


def test_missing_values_and_zero_weights_are_left_out_and_a_task_list_restricts_best():
    metrics = {"A": {"ctr": _m(0.6, 10, 0.7, 5, 0.3, 50), "cvr": _m(None, 0, None, 0, 0.1, 50)},
               "B": {"ctr": _m(0.9, 0, 0.9, 3, 0.2, 30)}}
    assert weighted_score(metrics, "gauc", [("A", "ctr"), ("A", "cvr"), ("B", "ctr")]) == pytest.approx(0.6)
    assert weighted_score(metrics, "gauc", [("A", "cvr")]) is None
    scores = parse_selection("logloss,A@cvr").scores(metrics)
    assert scores["best-A"] == pytest.approx(-0.1)
    assert scores["best"] == pytest.approx(-(0.1 * 50 + 0.2 * 30) / 80)  # A's ctr left out of `best` too


# ---- the trainer ---------------------------------------------------------------------------------


def _run(tmp, cfg: TrainConfig, *, resume=False):
    torch.manual_seed(0)
    return fit(TinyRanker(SCHEMA), MemoryBatches(TRAIN, shuffle=True, seed=cfg.seed),
               MemoryBatches(VALID, shuffle=False, seed=0), SCHEMA, cfg, tmp,
               run_config={"arch": "tiny", "model": {}, "schema": SCHEMA.model_dump(mode="json")}, resume=resume)


def _epoch(gauc: float, auc: float, logloss: float, small_gauc: float) -> dict:
    """Valid metrics of one epoch: BIG decides each global metric; SMALL has 3 users."""
    big = _m(gauc, 500, auc, 200, logloss, 5000)
    return {"BIG": {"ctr": big, "ctcvr": big}, "SMALL": {"ctr": _m(small_gauc, 3, 0.5, 2, 0.5, 20)}}


# GAUC peaks at epoch 1, AUC at epoch 3, logloss (lowest) at epoch 2; SMALL's GAUC at epoch 3.
SEQUENCE = [_epoch(0.70, 0.60, 0.40, 0.50), _epoch(0.65, 0.62, 0.30, 0.40), _epoch(0.60, 0.66, 0.35, 0.99)]


@pytest.fixture
def scripted_valid(monkeypatch):
    """The trainer's end-of-epoch evaluation returns SEQUENCE, one entry per call; calling the
    fixture's value starts the sequence again (for a second run)."""
    import mtfm.train.trainer as trainer

    def restart() -> None:
        calls = iter(SEQUENCE)
        monkeypatch.setattr(trainer, "evaluate_split", lambda *a, **k: next(calls))

    restart()
    return restart


@pytest.mark.parametrize("select, best_epoch, small_epoch", [
    ("gauc", 1, 3), ("auc", 3, 1), ("logloss", 2, 1), ("auc,SMALL=gauc", 3, 3),
])
def test_the_trainer_picks_the_best_epoch_of_the_selected_metric(tmp_path, scripted_valid, select, best_epoch,
                                                                 small_epoch):
    # SMALL's own snapshot under auc / logloss: its values do not move (0.5), so epoch 1 stays
    result = _run(tmp_path, TrainConfig(epochs=3, select=select, **BASE))
    m = result.metrics
    assert m["select"] == select and m["best"]["epoch"] == best_epoch
    assert m["best_by_scenario"]["SMALL"]["epoch"] == small_epoch
    assert all(h["select"] == select for h in m["history"])
    pointer = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert pointer["select"] == select and pointer["epoch"] == best_epoch
    assert pointer["score"] == pytest.approx(m["history"][best_epoch - 1]["selection_score"])
    small = json.loads((tmp_path / "checkpoints" / "best-SMALL.json").read_text())
    assert small["select"] == parse_selection(select).rule("best-SMALL")
    with open(tmp_path / "train_log.csv") as f:
        ends = [r for r in csv.DictReader(f) if r["select"]]
    assert [r["select"] for r in ends] == [select] * 3
    assert [float(r["valid_score"]) for r in ends] == pytest.approx([h["selection_score"] for h in m["history"]])


def test_early_stopping_follows_the_selected_metric(tmp_path, scripted_valid):
    # GAUC only falls after epoch 1, so patience 1 stops after epoch 2; AUC keeps rising: all 3 epochs run.
    gauc = _run(tmp_path / "gauc", TrainConfig(epochs=3, **{**BASE, "patience": 1}, select="gauc,SMALL=auc"))
    assert gauc.metrics["status"] == "early_stopping" and gauc.metrics["epochs_completed"] == 2
    scripted_valid()
    auc = _run(tmp_path / "auc", TrainConfig(epochs=3, **{**BASE, "patience": 1}, select="auc"))
    assert auc.metrics["status"] == "epochs" and auc.metrics["epochs_completed"] == 3


def test_resuming_with_another_selection_is_refused_and_the_same_one_resumes(tmp_path):
    first = TrainConfig(epochs=2, max_steps=4, select="auc", **BASE)
    _run(tmp_path, first)
    with pytest.raises(CheckpointError) as err:
        _run(tmp_path, TrainConfig(epochs=2, select="gauc", **BASE), resume=True)
    assert "['select']" in str(err.value) and "'auc'" in str(err.value) and "'gauc'" in str(err.value)
    assert "select" not in TrainConfig.RESUMABLE_CHANGES
    resumed = _run(tmp_path, TrainConfig(epochs=2, select="auc", **BASE), resume=True)
    assert resumed.metrics["select"] == "auc" and resumed.metrics["epochs_completed"] == 2
