"""`mtfm bench hta` (mtfm.bench.hta, issue 13): the HTA ablation of paper Table 3 end to end at tiny
size through the CLI, the '(K:P)xB [kv=..] [batch=..]' configs and their depth scaling, and the
output-directory rule. No timing assertions: the figures are only checked to be finite."""

from __future__ import annotations

import json
import math
import re

import pytest

from mtfm.bench.hta import (
    DEFAULT_CONFIGS,
    MARKER,
    REPORT,
    AblationConfig,
    model_config_for,
    parse_config,
    scale_config,
)
from mtfm.cli import main

TINY = ["--layers", "2", "--seeds", "0", "--max-steps", "2", "--batch-size", "32", "--users", "150",
        "--history-days", "20", "--history-max-len", "48", "--realtime-max-len", "24", "--quiet"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("hta") / "out"
    code = main(["bench", "hta", "--out", str(out), "--in-process", *TINY])
    return code, out


def _table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row] for row in rows[1:]]  # without the header row


def test_the_ablation_runs_end_to_end_and_reports_every_config(ablation, capsys):
    code, out = ablation
    assert code == 0
    rows = _table_rows((out / REPORT).read_text())
    assert len(rows) == len(DEFAULT_CONFIGS)
    assert [r[1] for r in rows] == ["(0:2)x1", "(2:0)x1", "(1:1)x1", "(3:1)x1", "(5:1)x1", "(3:1)x1", "(3:1)x1"]
    assert [r[3] for r in rows] == ["1", "1", "1", "1", "1", "2", "1"]  # kv groups: the preset's 2 heads w/o GQA
    assert [r[4] for r in rows] == ["1x"] * 5 + ["2x", "2x"]
    result = json.loads((out / MARKER).read_text())
    assert result["status"] == "done" and len(result["runs"]) == len(DEFAULT_CONFIGS)
    assert result["world"]["hr_tokens_per_sample"] > 0
    for run in result["runs"]:
        for scenario in ("HP", "PHF"):
            for name in ("auc", "gauc"):
                assert math.isfinite(run["test"][scenario]["ctr"][name])
        assert run["samples"] > 0 and run["samples_per_s"] > 0 and run["exposures_per_s"] > 0
    for row in result["summary"]:
        assert math.isfinite(row["mean_gauc"]) and math.isfinite(row["delta_gauc_pp"])
    assert result["summary"][0]["delta_gauc_pp"] == 0.0  # full attention is the reference
    # the budget is samples: the batch=2 rows run half the steps of twice the batch
    steps = {(r["config"]): r["steps"] for r in result["runs"]}
    assert steps["(3:1)x1"] == 2 and steps["(3:1)x1 kv=H batch=2"] == 1


def test_a_run_in_its_own_process_measures_peak_memory(ablation, tmp_path):
    _, first = ablation
    out = tmp_path / "spawned"
    assert main(["bench", "hta", "--out", str(out), "--data", str(first / "data"), "--configs", "(3:1)x4",
                 *TINY]) == 0
    run = json.loads((out / MARKER).read_text())["runs"][0]
    assert run["peak_rss_mib"] > run["rss_before_train_mib"] > 0
    assert not (out / "data").exists()  # --data: the given world, none prepared


def test_an_existing_output_directory_is_refused_unless_overwrite(ablation, tmp_path, capsys):
    _, first = ablation
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["bench", "hta", "--out", str(out), "--data", str(first / "data"), "--configs", "(0:16)x1", *TINY]
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--in-process"]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main([*args, "--overwrite", "--in-process"]) == 0  # an empty directory may be used
    assert main([*args, "--overwrite", "--in-process"]) == 0  # and an earlier ablation's output replaced
    assert len(_table_rows((out / REPORT).read_text())) == 1


@pytest.mark.parametrize("text, expected", [
    ("(3:1)x4", AblationConfig(3, 1, 4)),
    ("(0:16)x1", AblationConfig(0, 16, 1)),
    (" ( 5 : 1 ) X3 ", AblationConfig(5, 1, 3)),
    ("(3:1)x4 kv=H batch=2", AblationConfig(3, 1, 4, "H", 2)),
    ("(3:1)x4 kv=h", AblationConfig(3, 1, 4, "H", 1)),
    ("(3:1)x4 kv=1", AblationConfig(3, 1, 4, 1, 1)),
])
def test_configs_parse_and_print_back(text, expected):
    config = parse_config(text)
    assert config == expected and parse_config(config.spec) == config


@pytest.mark.parametrize("text, message", [
    ("3:1x4", "expected '(K:P)xB"), ("(3:1)x0", "B >= 1"), ("(0:0)x2", "K + P >= 1"),
    ("(3:1)x4 kv=0", "kv must be a positive integer"), ("(3:1)x4 batch=two", "batch must be"),
    ("(3:1)x4 heads=2", "unknown option 'heads'"),
])
def test_bad_configs_name_the_problem(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(text)


def test_depth_scaling_keeps_the_block_shape():
    at = lambda layers: [scale_config(parse_config(c), layers).spec for c in DEFAULT_CONFIGS]
    assert at(16) == list(DEFAULT_CONFIGS)
    assert at(4) == ["(0:4)x1", "(4:0)x1", "(1:1)x2", "(3:1)x1", "(5:1)x1", "(3:1)x1 kv=H batch=2",
                     "(3:1)x1 kv=1 batch=2"]
    assert at(8)[:5] == ["(0:8)x1", "(8:0)x1", "(1:1)x4", "(3:1)x2", "(5:1)x2"]
    assert [scale_config(parse_config(c), 16).layers for c in DEFAULT_CONFIGS[:5]] == [16, 16, 16, 16, 18]
    with pytest.raises(ValueError, match="at least 1"):
        scale_config(parse_config("(3:1)x4"), 0)


def test_model_overrides_set_the_stack_and_the_key_value_heads():
    base = {"num_heads": 4, "num_kv_groups": 1, "d_model": 64}
    full = model_config_for(parse_config("(0:16)x1"), base)
    assert (full["target_layers_per_block"], full["full_layers_per_block"], full["blocks"]) == (0, 16, 1)
    assert full["num_kv_groups"] == 1
    assert model_config_for(parse_config("(3:1)x4 kv=H"), base)["num_kv_groups"] == 4
    assert model_config_for(parse_config("(3:1)x4 kv=2"), base)["num_kv_groups"] == 2
    with pytest.raises(ValueError, match="must divide num_heads"):
        model_config_for(parse_config("(3:1)x4 kv=3"), base)


def test_duplicate_configs_after_scaling_are_refused(tmp_path, capsys):
    assert main(["bench", "hta", "--out", str(tmp_path / "o"), "--configs", "(3:1)x4", "(3:1)x3", *TINY]) == 2
    assert "appear twice at 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
