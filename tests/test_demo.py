"""`mtfm demo` end to end on a small synthetic world: prepare -> train MTFM and LR -> evaluate."""

from __future__ import annotations

import json

from train_fixtures import write_tiny_model_yaml

from mtfm.cli import main


def test_demo_runs_end_to_end_and_prints_the_table_beside_the_oracle(tmp_path, capsys):
    out = tmp_path / "demo"
    model = write_tiny_model_yaml(tmp_path / "tiny.yaml")
    args = ["demo", "--out", str(out), "--users", "150", "--max-steps", "4", "--model", model, "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| scenario |"))
    assert all(col in header for col in ("AUC", "GAUC", "LR GAUC", "oracle AUC", "oracle GAUC", "GAUC gap closed"))
    rows = [line for line in printed.splitlines() if line.startswith("| SQS |")]
    assert len(rows) == 4  # ctr, ctcvr, imd, write
    for run in ("mtfm", "lr"):
        result = json.loads((out / run / "eval_test.json").read_text())
        assert set(result) == {"HP", "PHF", "SQS"} and "oracle_gauc" in result["HP"]["ctr"]
    assert set(json.loads((out / "timings.json").read_text())) >= {"prepare_s", "train_mtfm_s", "evaluate_s", "total_s"}

    assert main(args + ["--no-baseline"]) == 0  # a second run replaces the demo's own directory
    assert not (out / "lr").exists()


def test_demo_refuses_to_clear_a_directory_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--users", "150", "--max-steps", "1", "--quiet"]) == 2
    assert "was not made by `mtfm demo`" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
