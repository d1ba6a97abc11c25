"""`mtfm diagnose`: the signal-recovery probes run on a trained synthetic run, report each
probe against the world's truth, and reach the model only through the behaviour log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.data.store import read_manifest
from mtfm.train.probes import run_probes, synthetic_world_of


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnose")
    data, model = prepare_synthetic(root / "data", users=150), write_tiny_model_yaml(root / "tiny.yaml")
    runs = {}
    for name, drop in (("full", []), ("no_sequences", ["--drop-inputs", "history,realtime"])):
        runs[name] = str(root / name)
        assert main(["train", "--data", data, "--out", runs[name], "--model", model, "--quiet", "--batch-size", "16",
                     "--epochs", "1", "--lr", "1e-3", *drop]) == 0
    return data, runs


def test_diagnose_prints_every_probe_beside_the_worlds_truth_and_writes_json(world, capsys):
    data, runs = world
    assert main(["diagnose", "--run", runs["full"], "--data", data, "--exposures", "6"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((Path(runs["full"]) / "diagnose.json").read_text())
    assert {r["scenario"] for r in rows} == {"HP", "PHF", "SQS"} and len(rows) == 12
    truth = {r["probe"]: r["true_change"] for r in rows}
    assert truth == {"search, same cuisine, 10 min": 1.2, "other feed, same cuisine, 10 min": 1.2,
                     "search, same cuisine, 3 h": 0.0, "search, other cuisine, 10 min": 0.0}
    assert all(r["exposures"] == 6 for r in rows)
    # An inserted click is a new R token: a trained model with real-time tokens sees it.
    assert any(abs(r["mean"]) > 0 for r in rows)
    assert "| HP | search, same cuisine, 10 min | +1.20 |" in printed


def test_a_click_reaches_a_model_only_through_its_behaviour_tokens(world):
    """A run trained without H and R cannot see an inserted click (the exposure's own cross
    features are left as they are): every change is exactly zero."""
    data, runs = world
    for r in run_probes(runs["no_sequences"], data, ["HP"], exposures=5):
        assert r.mean == 0.0 and r.std == 0.0, r


def test_probes_refuse_data_that_is_not_a_synthetic_world(world):
    data, _ = world
    manifest = read_manifest(data)
    other = manifest.model_copy(update={"source": {"source": "movielens"}})
    with pytest.raises(ValueError, match="probes need a synthetic world"):
        synthetic_world_of(other, "somewhere")
