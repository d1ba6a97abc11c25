"""`mtfm compare`: the same budget and lr sweep for every model, the table's marks, the paired
verdicts, and an interrupted comparison continuing from its finished runs."""

from __future__ import annotations

import json

import pytest
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.compare.runner import CompareConfig, ModelResult, RunResult, run_comparison, run_one
from mtfm.compare.table import markdown_table, paired_lower_bound, verdicts


def _run(model: str, seed: int, auc: float, gauc: float, positives: int = 500, lr: float = 1e-3,
         score: float | None = 0.6) -> RunResult:
    cell = {"auc": auc, "gauc": gauc, "positives": positives, "oracle_auc": 0.9, "oracle_gauc": 0.8}
    test = {"A": {"ctr": cell, "cvr": {**cell, "positives": 20}}}
    return RunResult(model, lr, seed, score, {}, test, 1.0, 100.0)


def _model(model: str, aucs: list[float], gaucs: list[float]) -> ModelResult:
    runs = [_run(model, s, a, g) for s, (a, g) in enumerate(zip(aucs, gaucs))]
    return ModelResult(model, runs[:1], runs[0].lr, runs, 1.0)


RESULTS = [
    _model("mtfm", [0.75, 0.76, 0.77], [0.70, 0.69, 0.71]),
    _model("logistic", [0.70, 0.71, 0.72], [0.695, 0.70, 0.705]),
    _model("dcnv2", [0.74, 0.745, 0.75], [0.60, 0.61, 0.62]),
]


def test_the_best_mean_is_bold_the_second_underlined_and_small_cells_marked():
    table = markdown_table(RESULTS, min_positives=200)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "**0.7600 ± 0.0100**" in rows["MTFM"]  # ctr AUC: MTFM first
    assert "<u>0.7450 ± 0.0050</u>" in rows["DCNv2"]  # ctr AUC: DCNv2 second
    assert "**0.7000 ± 0.0050**" in rows["LR"]  # ctr GAUC: LR's mean 0.700 = MTFM's 0.700: ties keep model order
    assert "A cvr† AUC" in table and "A ctr AUC" in table and "A ctr† AUC" not in table
    assert "oracle (true p) | 0.9000 | 0.8000" in table


def test_verdicts_are_paired_by_seed_and_say_when_mtfm_is_not_ahead():
    by_cell = {(v.cell, v.metric): v for v in verdicts(RESULTS, min_positives=200)}
    auc = by_cell[("A ctr", "auc")]
    assert auc.best_other == "dcnv2" and auc.mean_diff == pytest.approx(0.015)
    assert auc.lower_bound == pytest.approx(paired_lower_bound([0.01, 0.015, 0.02]))
    assert auc.outcome == "wins beyond seed noise"
    assert by_cell[("A ctr", "gauc")].outcome == "behind"  # a tie is not a win
    assert by_cell[("A cvr", "auc")].outcome == "underpowered"


def test_a_paired_bound_needs_two_seeds_and_widens_with_spread():
    assert paired_lower_bound([0.01]) is None
    tight, loose = paired_lower_bound([0.01, 0.011, 0.012]), paired_lower_bound([0.0, 0.011, 0.022])
    assert tight > 0 > loose


def test_unknown_models_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown \\['xgb'\\]"):
        CompareConfig(models=["mtfm", "xgb"]).check_models()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return prepare_synthetic(root / "data", users=80), write_tiny_model_yaml(root / "tiny.yaml")


def test_every_model_gets_the_same_sweep_and_a_finished_run_is_reused(world, tmp_path):
    data, tiny = world
    cfg = CompareConfig(models=["mtfm", "logistic"], seeds=[0, 1], epochs=1, max_steps=4, patience=None,
                        lr_factors=[0.5, 2.0], mtfm_model=tiny)
    results = run_comparison(data, tmp_path, cfg, progress=False)
    for r in results:
        assert len(r.sweep) == 2 and len(r.runs) == 2
        assert sorted(s.lr / r.sweep[0].lr for s in r.sweep) == [1.0, 4.0]  # the same factors of each preset
        assert r.chosen_lr == max(r.sweep, key=lambda s: s.valid_score).lr
        assert {x.lr for x in r.runs} == {r.chosen_lr} and [x.seed for x in r.runs] == [0, 1]
        assert all(x.settings["epochs"] == 1 and x.settings["max_steps"] == 4 for x in r.sweep + r.runs)
    record = json.loads((tmp_path / "compare.json").read_text())
    assert [m["model"] for m in record["models"]] == ["mtfm", "logistic"]
    assert "| MTFM |" in (tmp_path / "table.md").read_text()
    first = results[1].runs[0]
    done = tmp_path / "runs" / "logistic" / f"lr{first.lr:.3g}-seed0" / "result.json"
    stamp = done.stat().st_mtime_ns
    again = run_one(tmp_path.__class__(data), tmp_path, "logistic", first.lr, 0, cfg)
    assert again.test == first.test and done.stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(ValueError, match="other settings"):
        run_one(tmp_path.__class__(data), tmp_path, "logistic", first.lr, 0, cfg.model_copy(update={"epochs": 2}))


def test_the_command_writes_the_table_and_refuses_a_bad_model_list(world, tmp_path, capsys):
    data, tiny = world
    assert main(["compare", "--data", data, "--out", str(tmp_path / "c"), "--models", "logistic", "--quick",
                 "--quiet"]) == 0
    assert "| LR |" in capsys.readouterr().out
    assert main(["compare", "--data", data, "--out", str(tmp_path / "d"), "--models", "lr"]) == 2
    assert "unknown ['lr']" in capsys.readouterr().err
