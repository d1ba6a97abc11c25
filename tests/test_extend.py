"""Warm start / adding a scenario (issue 16, `mtfm train --init-from RUN --freeze ...`): old weights are
copied by name and shape (frozen ones stay bit-identical through training), the new scenario's
modules start as in a normal train and learn, it gets scored, and warm starts that cannot mean
anything (another shape, model config, id encoding) are refused naming the tensor or field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY_MTFM, prepare_synthetic, write_tiny_model_yaml

from mtfm.cli import main
from mtfm.cli.train import model_config_from_args
from mtfm.config import schema_from_dict
from mtfm.data.loader import BatchLoader
from mtfm.train.checkpoint import CheckpointManager
from mtfm.train.config import TrainConfig
from mtfm.train.extend import WarmStart, WarmStartError, warm_start
from mtfm.train.models import build_model
from mtfm.train.rundata import data_record
from mtfm.train.trainer import fit

ALL = ["HP", "PHF", "SQS"]


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A prepared world and a tiny MTFM trained one epoch on HP,PHF only (the run to extend)."""
    root = tmp_path_factory.mktemp("extend")
    data = prepare_synthetic(root / "data", users=150)
    model = write_tiny_model_yaml(root / "tiny.yaml")
    run = root / "old"
    assert _train(data, run, model, "--scenarios", "HP,PHF", "--epochs", "1") == 0
    return data, model, run


def _train(data, out, model, *extra) -> int:
    return main(["train", "--data", data, "--out", str(out), "--model", model, "--quiet", "--batch-size", "16",
                 "--threads", "1", *extra])


def _old_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(CheckpointManager(run).best() / "model.safetensors"))


def _new_model(data: str, model_yaml: str, out: Path, *, model_config: dict | None = None, schema=None):
    """What train_from_data builds for HP,PHF,SQS (seeded the same way), with its run config."""
    train = BatchLoader(data, "train", 16, shuffle=True, seed=0, scenarios=ALL)
    valid = BatchLoader(data, "valid", 64, shuffle=False, seed=0, scenarios=ALL)
    config = model_config or model_config_from_args("mtfm", model_yaml)
    schema = schema or train.schema
    torch.manual_seed(0)
    model = build_model("mtfm", config, schema)
    run_config = {"arch": "mtfm", "model": config, "scenarios": schema.scenario_names, "drop_inputs": [],
                  "schema": schema.model_dump(mode="json"), "data": data_record(data)}
    return model, run_config, train, valid


def _fit(model, run_config, train, valid, out: Path, steps: int = 4):
    cfg = TrainConfig(max_steps=steps, epochs=10, lr=3e-3, progress=False, threads=1)
    return fit(model, train, valid, train.schema, cfg, out, run_config=run_config)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_freeze_none_copies_every_old_tensor_and_starts_the_new_scenario_as_a_normal_train(old, tmp_path):
    data, yaml_path, run = old
    model, run_config, train, valid = _new_model(data, yaml_path, tmp_path / "new")
    fresh = _params(model)  # a normal train's initial weights (same seed, same model)
    record = warm_start(model, run_config, WarmStart(run, "none"), tmp_path / "new", verbose=False)
    old_weights, start = _old_weights(run), _params(model)
    copied = [n for n in start if n in old_weights]
    assert record["copied_tensors"] == len(copied) > 0 and record["frozen"] == []
    assert all(torch.equal(start[n], old_weights[n]) for n in copied)
    assert not all(torch.equal(start[n], fresh[n]) for n in copied)  # really copied, not the fresh init
    new = [n for n in start if n not in old_weights]
    assert new and all("SQS" in n for n in new)  # tokenizer, GLN group T_SQS, heads SQS__*, SQS-only tables
    assert any(".gln_" in n and n.endswith("T_SQS") for n in new) and any(n.startswith("head.towers.SQS__") for n in new)
    assert all(torch.equal(start[n], fresh[n]) for n in new)
    trained = _params(_fit(model, run_config, train, valid, tmp_path / "new").model)
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(trained["stack.blocks.0.fulls.0.f1.weight"], start["stack.blocks.0.fulls.0.f1.weight"])


def test_freeze_shared_keeps_every_old_weight_bit_identical_while_the_new_scenario_learns(old, tmp_path):
    data, yaml_path, run = old
    model, run_config, train, valid = _new_model(data, yaml_path, tmp_path / "new")
    record = warm_start(model, run_config, WarmStart(run, "shared"), tmp_path / "new", verbose=False)
    start, old_weights = _params(model), _old_weights(run)
    assert set(record["frozen"]) == set(old_weights) & set(start)
    trained = _params(_fit(model, run_config, train, valid, tmp_path / "new").model)
    for name in record["frozen"]:
        assert torch.equal(trained[name], old_weights[name]), name
    new = [n for n in start if n not in old_weights]
    moved = [n for n in new if not torch.equal(trained[n], start[n])]
    assert "scenario_tokenizers.SQS.0.weight" in moved and any(n.startswith("head.towers.SQS__ctr") for n in moved)
    assert any(n.endswith("T_SQS") for n in moved)  # its GLN group trains inside the frozen stack


def test_freeze_backbone_freezes_the_old_stack_only(old, tmp_path):
    data, yaml_path, run = old
    model, run_config, train, valid = _new_model(data, yaml_path, tmp_path / "new")
    record = warm_start(model, run_config, WarmStart(run, "backbone"), tmp_path / "new", verbose=False)
    start = _params(model)
    assert record["frozen"] and all(n.startswith("stack.") for n in record["frozen"])
    trained = _params(_fit(model, run_config, train, valid, tmp_path / "new").model)
    assert all(torch.equal(trained[n], start[n]) for n in record["frozen"])
    stack_new = [n for n in start if n.startswith("stack.") and n not in record["frozen"]]
    assert stack_new and all(n.endswith("T_SQS") for n in stack_new)
    assert not torch.equal(trained["head.experts.0.0.0.weight"], start["head.experts.0.0.0.weight"])
    assert not torch.equal(trained["history_tokenizers.clicks.0.weight"], start["history_tokenizers.clicks.0.weight"])


def test_the_cli_extends_a_run_records_it_scores_the_new_scenario_and_leaves_frozen_scenarios_unchanged(old, tmp_path, capsys):
    data, yaml_path, run = old
    new = tmp_path / "new"
    capsys.readouterr()
    assert _train(data, new, yaml_path, "--scenarios", "HP,PHF,SQS", "--epochs", "1", "--init-from", str(run),
                  "--freeze", "shared") == 0
    printed = capsys.readouterr().out
    assert "warm start from" in printed and "copied:" in printed and "frozen (--freeze shared)" in printed
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["init"]["from_run"] == str(run.resolve()) and metrics["init"]["freeze"] == "shared"
    assert metrics["init"]["old_scenarios"] == ["HP", "PHF"] and "frozen" not in metrics["init"]
    assert json.loads((CheckpointManager(new).latest() / "config.json").read_text())["init"]["frozen"]

    assert main(["evaluate", "--run", str(run), "--data", data]) == 0
    assert main(["evaluate", "--run", str(new), "--data", data]) == 0
    before = json.loads((run / "eval_test.json").read_text())
    after = json.loads((new / "eval_test.json").read_text())
    assert set(after) == set(ALL) and after["SQS"]["ctr"]["gauc"] is not None
    for scenario in ("HP", "PHF"):  # bit-identical weights: the same scores (batches hold other users: float noise)
        for task, m in before[scenario].items():
            assert after[scenario][task]["gauc"] == pytest.approx(m["gauc"], abs=1e-9), (scenario, task)
            assert after[scenario][task]["auc"] == pytest.approx(m["auc"], abs=1e-9), (scenario, task)

    # --resume must ask for the same warm start (its frozen set decides the optimizer's slots)
    assert _train(data, new, yaml_path, "--scenarios", "HP,PHF,SQS", "--epochs", "2", "--resume") == 2
    assert "cannot resume it without --init-from" in capsys.readouterr().err


def test_a_resumed_extension_keeps_its_frozen_weights(old, tmp_path):
    data, yaml_path, run = old
    new, args = tmp_path / "new", ["--scenarios", "HP,PHF,SQS", "--init-from", str(run), "--freeze", "shared"]
    assert _train(data, new, yaml_path, *args, "--max-steps", "2") == 0
    assert _train(data, new, yaml_path, *args, "--max-steps", "4", "--resume") == 0
    weights, old_weights = load_file(str(CheckpointManager(new).latest() / "model.safetensors")), _old_weights(run)
    assert CheckpointManager(new).latest().name == "step-00000004"
    assert all(torch.equal(weights[n], old_weights[n]) for n in old_weights)


def test_a_shape_mismatch_is_refused_naming_the_tensor(old, tmp_path, capsys):
    data, yaml_path, run = old
    wider = tmp_path / "wider.yaml"
    import yaml

    wider.write_text(yaml.safe_dump({**TINY_MTFM, "d_model": 24}))
    assert _train(data, tmp_path / "new", str(wider), "--scenarios", ALL[0], "--max-steps", "1",
                  "--init-from", str(run)) == 2
    err = capsys.readouterr().err
    assert "tensor '" in err and "[16," in err and "[24," in err and "cannot warm start" in err
    assert not (tmp_path / "new" / "checkpoints").exists()

    # a vocabulary that grew: the shared table is named
    schema = BatchLoader(data, "train", 16, shuffle=False, seed=0, scenarios=ALL).schema.model_dump(mode="json")
    for group in [*schema["history"], *schema["realtime"]]:
        for feature in group["features"]:
            if feature.get("share") == "cuisine":
                feature["num_embeddings"] += 3
    for sc in schema["scenarios"]:
        for feature in sc["item_features"]:
            if feature.get("share") == "cuisine":
                feature["num_embeddings"] += 3
    model, run_config, *_ = _new_model(data, yaml_path, tmp_path / "x", schema=schema_from_dict(schema))
    with pytest.raises(WarmStartError, match=r"tensor 'embeddings\.tables\.cuisine\.weight' has shape \[12, 4\] "
                                             r"there and \[15, 4\].*vocabulary size"):
        warm_start(model, run_config, WarmStart(run), tmp_path / "x", verbose=False)


def test_a_model_config_or_id_encoding_that_changes_meaning_is_refused(old, tmp_path):
    data, yaml_path, run = old
    config = {**model_config_from_args("mtfm", yaml_path), "attention_norm_len": 128}  # same shapes, other scores
    model, run_config, *_ = _new_model(data, yaml_path, tmp_path / "x", model_config=config)
    with pytest.raises(WarmStartError, match=r"model config differs in attention_norm_len: 256 there, 128 here"):
        warm_start(model, run_config, WarmStart(run), tmp_path / "x", verbose=False)

    schema = BatchLoader(data, "train", 16, shuffle=False, seed=0, scenarios=ALL).schema.model_dump(mode="json")
    for sc in schema["scenarios"]:  # restaurant ids hashed before, listed by number now: same rows, other meaning
        for feature in sc["item_features"]:
            if feature.get("share") == "restaurant_id":
                feature["num_embeddings"], feature["hash_buckets"] = feature["hash_buckets"], None
    model, run_config, *_ = _new_model(data, yaml_path, tmp_path / "x", schema=schema_from_dict(schema))
    with pytest.raises(WarmStartError, match=r"embedding table 'restaurant_id'.*encodes its ids otherwise"):
        warm_start(model, run_config, WarmStart(run), tmp_path / "x", verbose=False)


def test_bad_requests_are_refused_before_training(old, tmp_path, capsys):
    data, yaml_path, run = old
    assert _train(data, tmp_path / "a", yaml_path, "--max-steps", "1", "--freeze", "shared") == 2
    assert "--freeze needs --init-from" in capsys.readouterr().err
    assert _train(data, run, yaml_path, "--max-steps", "1", "--init-from", str(run)) == 2
    assert "are the same run" in capsys.readouterr().err
    assert _train(data, tmp_path / "b", yaml_path, "--max-steps", "1", "--init-from", str(tmp_path / "none")) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert _train(data, tmp_path / "c", yaml_path, "--scenarios", "HP,PHF", "--max-steps", "1", "--init-from",
                  str(run), "--freeze", "shared") == 2
    assert "leaves nothing to train" in capsys.readouterr().err
