"""A run remembers its data (issue 11, part 2, item 3): --resume used to continue on another
dataset and compare validation scores across the two; evaluate and predict scored any data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safety_helpers import make_synthetic, train_args

from mtfm.cli import main
from mtfm.data.store import data_fingerprint


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A tiny MTFM run of two steps on the first world."""
    one, _, model = synthetic
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(one, run, model, "--max-steps", "2", "--checkpoint-every", "1")) == 0
    return run


def test_resume_on_other_data_is_refused_unless_allowed(synthetic, trained, tmp_path, capsys):
    one, two, model = synthetic
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["fingerprint"] == data_fingerprint(one)

    capsys.readouterr()
    assert main(train_args(two, run, model, "--max-steps", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{two}: not the data {run} was trained on" in err and "pass --allow-other-data to resume" in err
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2  # nothing ran

    with pytest.warns(UserWarning, match="going on \\(--allow-other-data\\)"):
        assert main(train_args(two, run, model, "--max-steps", "3", "--resume", "--allow-other-data")) == 0
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["steps"] == 3 and resumed["data"]["fingerprint"] == data_fingerprint(two)


def test_evaluate_on_other_data_is_refused_unless_allowed(synthetic, trained, capsys):
    one, two, _ = synthetic
    assert main(["evaluate", "--run", str(trained), "--data", str(one), "--split", "valid"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained), "--data", str(two), "--split", "valid"]) == 2
    err = capsys.readouterr().err
    assert f"{two}: not the data" in err and "pass --allow-other-data to evaluate" in err
    with pytest.warns(UserWarning, match="not the data"):
        assert main(["evaluate", "--run", str(trained), "--data", str(two), "--split", "valid",
                     "--allow-other-data"]) == 0
    out = trained.parent / "pred.parquet"
    assert main(["predict", "--run", str(trained), "--data", str(two), "--out", str(out)]) == 2
    assert "pass --allow-other-data to predict" in capsys.readouterr().err and not out.exists()
