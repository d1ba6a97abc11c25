"""`mtfm train` / `mtfm evaluate` on a prepared synthetic world with a tiny MTFM: outputs,
single-scenario runs, the LR baseline, and a run killed with SIGKILL mid-epoch then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_fixtures import prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.data.store import read_manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return prepare_synthetic(root / "data", users=150), write_tiny_model_yaml(root / "tiny.yaml")


def _train(data, out, model, *extra):
    return main(["train", "--data", data, "--out", str(out), "--model", model, "--quiet", "--batch-size", "16", *extra])


def test_train_then_evaluate_writes_checkpoints_metrics_and_the_eval_table(world, tmp_path, capsys):
    data, model = world
    assert _train(data, tmp_path / "run", model, "--epochs", "1", "--lr", "1e-3") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "epochs" and metrics["epochs_completed"] == 1
    assert metrics["scenarios"] == ["HP", "PHF", "SQS"]
    assert metrics["data"]["train_samples"] == read_manifest(data).splits["train"].samples
    assert (tmp_path / "run" / "checkpoints" / "best.json").is_file()

    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data", data]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    manifest = read_manifest(data)
    assert set(result) == {"HP", "PHF", "SQS"} and set(result["SQS"]) == {"ctr", "ctcvr", "imd", "write"}
    for scenario, tasks in result.items():
        for task, m in tasks.items():
            assert {"auc", "gauc", "logloss", "oracle_auc", "oracle_gauc"} <= set(m)
            assert m["exposures"] == manifest.splits["test"].scenario_exposures[scenario]
            assert m["oracle_auc"] == pytest.approx(manifest.oracle["test"][scenario][task]["auc"])
    assert "| SQS | ctr |" in printed and "oracle GAUC" in printed

    # Scenarios scored from different checkpoints are merged in schema order: point SQS at the
    # epoch-end training checkpoint (same weights as the snapshot after one epoch).
    from mtfm.train.checkpoint import CheckpointManager, write_json
    from mtfm.train.evaluate import evaluate_run

    mgr = CheckpointManager(tmp_path / "run")
    write_json(mgr.root / "best-SQS.json", {"checkpoint": mgr.latest().name})
    merged, chosen = evaluate_run(tmp_path / "run", data, "test")
    assert chosen["SQS"] == mgr.latest() and chosen["HP"] == mgr.best() != mgr.latest()
    assert list(merged) == ["HP", "PHF", "SQS"] and merged == result


def test_a_single_scenario_run_trains_and_scores_only_that_scenario(world, tmp_path):
    data, model = world
    assert _train(data, tmp_path / "sqs", model, "--max-steps", "2", "--scenarios", "SQS") == 0
    metrics = json.loads((tmp_path / "sqs" / "metrics.json").read_text())
    assert metrics["scenarios"] == ["SQS"] and metrics["status"] == "max_steps"
    assert metrics["data"]["skipped_samples"]["train"] > 0  # samples without SQS exposures, counted
    assert main(["evaluate", "--run", str(tmp_path / "sqs"), "--data", data]) == 0
    assert set(json.loads((tmp_path / "sqs" / "eval_test.json").read_text())) == {"SQS"}


def test_an_input_ablation_run_has_no_such_tokens_and_is_scored_and_predicted_without_them(world, tmp_path):
    from mtfm.config import SchemaError
    from mtfm.train.checkpoint import CheckpointError
    from mtfm.train.config import TrainConfig
    from mtfm.train.evaluate import scenario_checkpoints
    from mtfm.train.trainer import train_from_data
    from mtfm.train.models import model_from_checkpoint

    data, model = world
    run = tmp_path / "no-seq"
    assert _train(data, run, model, "--max-steps", "2", "--drop-inputs", "history,realtime,cross") == 0
    saved, _, schema = model_from_checkpoint(scenario_checkpoints(run)["HP"])
    assert schema.history == [] and schema.realtime == [] and all(not s.cross_features for s in schema.scenarios)
    assert saved.groups == ["T:HP", "T:PHF", "T:SQS"]  # no H or R token group at all
    assert not any("cross" in field for field in saved.embeddings.fields)
    assert main(["evaluate", "--run", str(run), "--data", data]) == 0
    assert set(json.loads((run / "eval_test.json").read_text())) == {"HP", "PHF", "SQS"}
    assert main(["predict", "--run", str(run), "--data", data, "--split", "test", "--out", str(tmp_path / "p.parquet")]) == 0
    # Resuming with other inputs is refused: the run would not be the same run.
    cfg = TrainConfig(max_steps=3, epochs=100, batch_size=16, progress=False)
    with pytest.raises(CheckpointError, match="drop_inputs"):
        train_from_data(data, run, arch="mtfm", model_config=saved.config.model_dump(mode="json"), cfg=cfg,
                        drop_inputs=["history"], resume=True)
    with pytest.raises(SchemaError, match="unknown input kind"):
        schema.without(["sequences"])


def test_the_logistic_baseline_trains_through_the_same_cli(world, tmp_path, capsys):
    data, _ = world
    assert main(["train", "--data", data, "--out", str(tmp_path / "lr"), "--arch", "logistic", "--epochs", "2",
                 "--lr", "1e-2", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "lr" / "metrics.json").read_text())
    assert metrics["arch"] == "logistic" and metrics["best"]["valid_mean_gauc"] > 0.5
    assert main(["train", "--data", data, "--out", str(tmp_path / "bad"), "--arch", "logistic", "--model", "small"]) == 2
    assert "--model small: file not found (a baseline takes a YAML of its config's fields)" in capsys.readouterr().err


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(world, tmp_path):
    data, model = world
    args = ["--epochs", "1", "--checkpoint-every", "3", "--lr", "1e-3", "--patience", "5"]
    assert _train(data, tmp_path / "full", model, *args) == 0

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtfm", "train", "--data", data, "--out", str(cut), "--model", model,
                             "--quiet", "--batch-size", "16", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest, deadline = cut / "checkpoints" / "latest.json", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["checkpoint"] >= "step-00000006":
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.json").exists()
    killed_at = json.loads(latest.read_text())["checkpoint"]
    full_steps = json.loads((tmp_path / "full" / "metrics.json").read_text())["steps"]
    assert int(killed_at.split("-")[1]) < full_steps  # the kill came mid-epoch

    assert _train(data, cut, model, *args, "--resume") == 0
    full, resumed = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", cut))
    assert resumed["history"] == full["history"] and resumed["steps"] == full["steps"]
    ckpt = lambda d: d / "checkpoints" / json.loads((d / "checkpoints" / "latest.json").read_text())["checkpoint"]
    a, b = load_file(str(ckpt(tmp_path / "full") / "model.safetensors")), load_file(str(ckpt(cut) / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_mtfm_trains_under_bf16_autocast(world, tmp_path):
    data, model = world
    assert _train(data, tmp_path / "bf16", model, "--max-steps", "3", "--bf16") == 0
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["final_valid"]["HP"]["ctr"]["auc"] is not None
    assert json.loads((tmp_path / "bf16" / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step-00000003"


def test_predict_writes_every_test_exposure_with_keys_that_join_back_to_the_source_rows(world, tmp_path, capsys):
    import polars as pl

    from mtfm.data.sources.synthetic import load_source
    from mtfm.metrics import task_metrics

    data, model = world
    assert _train(data, tmp_path / "run", model, "--epochs", "1", "--lr", "1e-3") == 0
    out = tmp_path / "pred" / "test.parquet"
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", data, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    pred = pl.read_parquet(out)
    manifest = read_manifest(data)
    counts = dict(pred.group_by("scenario").len().iter_rows())
    assert counts == manifest.splits["test"].scenario_exposures
    assert pred.select("source_table", "source_row").is_unique().all()
    # The keys point at the raw rows the exposures came from (same world: same seed and users).
    raw = load_source(None, manifest.schema_obj, 150, 0)  # the world fixture: 150 users, seed 0
    for scenario in ("HP", "SQS"):
        rows = pred.filter(pl.col("scenario") == scenario)
        table = raw.tables[rows["source_table"][0]]
        source = table[rows["source_row"].to_list()]
        assert source["user_id"].to_list() == rows["user_id"].to_list()
        assert source["ts"].to_list() == rows["ts"].to_list()
        assert source["click"].cast(pl.Float64).to_list() == rows["label.ctr"].to_list()
    # Tasks a scenario does not have are null; the scores give the metrics `evaluate` reports.
    assert pred.filter(pl.col("scenario") == "HP")["score.imd"].null_count() == counts["HP"]
    sqs = pred.filter(pl.col("scenario") == "SQS")
    m = task_metrics(sqs["user_id"].to_numpy(), sqs["label.ctr"].to_numpy(), sqs["score.ctr"].to_numpy())
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data", data]) == 0
    evaluated = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert m.auc == pytest.approx(evaluated["SQS"]["ctr"]["auc"], abs=1e-6)
    assert main(["predict", "--run", str(tmp_path / "run"), "--data", data, "--out", str(out)]) == 2  # exists


def test_select_chooses_the_snapshots_by_the_named_metrics_and_is_recorded(world, tmp_path, capsys):
    import csv

    from mtfm.train.selection import parse_selection, weighted_score

    data, model = world
    run = tmp_path / "run"
    assert _train(data, run, model, "--epochs", "1", "--select", "auc", "--select", "SQS=logloss@ctr") == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{"))
    assert json.loads(summary)["select"] == "auc,SQS=logloss@ctr"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["select"] == "auc,SQS=logloss@ctr"
    h = metrics["history"][0]
    valid = h["valid"]
    overall = [(s, t) for s in valid for t in (["ctr"] if s == "SQS" else valid[s])]
    assert h["selection_score"] == pytest.approx(weighted_score(valid, "auc", overall))
    assert h["selection_scenario_scores"]["SQS"] == pytest.approx(-valid["SQS"]["ctr"]["logloss"])
    assert json.loads((run / "checkpoints" / "best.json").read_text())["select"] == "auc,SQS=logloss@ctr"
    assert json.loads((run / "checkpoints" / "best-SQS.json").read_text())["select"] == "logloss@ctr"
    assert json.loads((run / "checkpoints" / "best-HP.json").read_text())["select"] == "auc"
    with open(run / "train_log.csv") as f:
        end = [r for r in csv.DictReader(f) if r["select"]]
    assert len(end) == 1 and float(end[0]["valid_score"]) == pytest.approx(h["selection_score"])
    assert parse_selection(metrics["select"]) == parse_selection("auc,SQS=logloss@ctr")

    # a changed selection cannot resume the run; bad or unknown parts are one-line errors (exit 2)
    assert _train(data, run, model, "--epochs", "2", "--resume", "--select", "gauc") == 2
    err = capsys.readouterr().err
    assert "['select']" in err and "'auc,SQS=logloss@ctr'" in err and "'gauc'" in err
    assert _train(data, tmp_path / "bad", model, "--epochs", "1", "--select", "SQS=acu") == 2
    assert "--select: 'SQS=acu': unknown metric 'acu'" in capsys.readouterr().err
    assert _train(data, tmp_path / "bad", model, "--epochs", "1", "--select", "auc,XX@ctr") == 2
    assert "unknown scenario 'XX'" in (err := capsys.readouterr().err) and "['HP', 'PHF', 'SQS']" in err
    assert _train(data, tmp_path / "bad", model, "--epochs", "1", "--select", "SQS@ctr+clicks") == 2
    assert "'SQS' has no task(s) ['clicks']" in (err := capsys.readouterr().err) and "'imd'" in err


def test_help_lists_the_presets_read_from_their_files(tmp_path, monkeypatch, capsys):
    import yaml

    import mtfm.cli.presets as presets
    from mtfm.train.config import train_preset_path

    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        return capsys.readouterr().out

    logistic = yaml.safe_load(train_preset_path("logistic").read_text())
    demo = help_of("demo")
    assert f"LR baseline (--arch logistic): preset logistic (train_logistic.yaml): lr={logistic['lr']}" in demo
    assert "MTFM training: preset mtfm (train_mtfm.yaml): lr=" in demo and "small (model_small.yaml): d_model 64" in demo
    train = help_of("train")
    assert all(f"{n} (model_{n}.yaml)" in train for n in ("small", "paper"))
    assert all(f"{n} (train_{n}.yaml)" in train for n in ("mtfm", "logistic")) and "--select" in train

    # the numbers come from the files when help is built, not from a copy in the code
    edited = tmp_path / "train_logistic.yaml"
    edited.write_text("lr: 0.123\nepochs: 9\n")
    real = presets.train_preset_path
    monkeypatch.setattr(presets, "train_preset_path", lambda name: edited if name == "logistic" else real(name))
    assert "preset logistic (train_logistic.yaml): lr=0.123, epochs=9" in help_of("demo")
