"""Config files (issue 11, part 2, item 7): a key given twice in a YAML is an error naming the
key and both lines (PyYAML alone keeps the last one silently), and a non-finite learning rate
(or any float setting) is refused when the training config is loaded."""

from __future__ import annotations

import pytest
import yaml

from mtfm.cli import main
from mtfm.config import SchemaError, dump_schema, load_schema
from mtfm.train.config import TrainConfigError, load_train_config
from mtfm.yamlio import DuplicateKeyError, safe_load


def test_a_duplicate_key_names_the_key_and_both_lines_at_any_depth():
    with pytest.raises(DuplicateKeyError, match=r"line 4: key 'lr' given twice \(first on line 2\)"):
        safe_load("epochs: 3\nlr: 1.0e-3\nseed: 0\nlr: 3.0e-4\n")
    with pytest.raises(DuplicateKeyError, match=r"line 4: key 'name' given twice \(first on line 3\)"):
        safe_load("scenarios:\n  - table: a\n    name: A\n    name: B\n")
    assert yaml.safe_load("lr: 1\nlr: 2\n") == {"lr": 2}  # what plain PyYAML does: the reason for this loader


def test_what_is_not_a_duplicate_still_loads():
    text = "defaults: &d {lr: 1.0e-3, seed: 0}\nrun:\n  <<: *d\n  lr: 3.0e-4\nother: {lr: 1}\n"
    assert safe_load(text) == {"defaults": {"lr": 1e-3, "seed": 0}, "run": {"lr": 3e-4, "seed": 0}, "other": {"lr": 1}}
    assert safe_load("a: [1, 1]\nb: {x: 1, y: 1}\n") == {"a": [1, 1], "b": {"x": 1, "y": 1}}


def test_schema_and_training_config_files_refuse_a_key_given_twice(tmp_path):
    from mtfm.data.sources.synthetic import packaged_schema_path

    schema = load_schema(packaged_schema_path())
    good = tmp_path / "schema.yaml"
    dump_schema(schema, good)
    lines = good.read_text().splitlines()
    window = next(i for i, line in enumerate(lines) if line.startswith("window:"))
    bad = tmp_path / "twice.yaml"
    bad.write_text("\n".join(lines + [lines[window]]) + "\n")
    with pytest.raises(SchemaError, match=rf"twice.yaml: not valid YAML: line {len(lines) + 1}: key 'window' given "
                                          rf"twice \(first on line {window + 1}\)"):
        load_schema(bad)

    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 1.0e-3\nepochs: 2\nlr: 3.0e-4\n")
    with pytest.raises(TrainConfigError, match=r"train.yaml: not valid YAML: line 3: key 'lr' given twice"):
        load_train_config(cfg)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "inf", "'nan'"])
def test_a_non_finite_learning_rate_is_refused_at_load(tmp_path, value):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"lr: {value}\n")
    with pytest.raises(TrainConfigError, match=r"train.yaml: invalid training config .*\n  lr: Input should be a "
                                               r"finite number"):
        load_train_config(cfg)


def test_a_non_finite_value_on_the_command_line_is_a_message_before_any_work(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--lr", "nan"]) == 2
    err = capsys.readouterr().err
    assert "mtfm train: error: training config (command line): invalid training config" in err
    assert "lr: Input should be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_model_config_file_refuses_a_key_given_twice(tmp_path):
    from mtfm.model.config import ModelConfigError, load_model_config

    bad = tmp_path / "model.yaml"
    bad.write_text("d_model: 64\nblocks: 2\nd_model: 32\n")
    with pytest.raises(ModelConfigError, match=r"model.yaml: not valid YAML: line 3: key 'd_model' given twice \(first on line 1\)"):
        load_model_config(bad)


def test_each_arch_trains_from_its_packaged_preset_unless_told_otherwise(tmp_path):
    import argparse

    from mtfm.cli.train import add_parser, train_config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = lambda *extra: parser.parse_args(["train", "--data", "d", "--out", "o", *extra])  # noqa: E731
    mtfm = train_config_from_args(args())
    assert (mtfm.lr, mtfm.embedding_optimizer, mtfm.attention_bias_lr_scale, mtfm.epochs) == (3e-4, "shared", 30.0, 3)
    assert mtfm == load_train_config("mtfm").model_copy(update={"progress": True})
    logistic = train_config_from_args(args("--arch", "logistic"))
    assert (logistic.lr, logistic.embedding_optimizer, logistic.epochs) == (1e-2, "shared", 4)
    # a flag overrides the preset; an embedding lr brings the embeddings' own optimizer with it
    cfg = train_config_from_args(args("--arch", "logistic", "--embedding-lr", "0.05", "--lr", "0.02"))
    assert (cfg.lr, cfg.embedding_optimizer, cfg.embedding_lr) == (0.02, "adam", 0.05)
    with pytest.raises(TrainConfigError, match="unknown training preset"):
        from mtfm.train.config import train_preset_path

        train_preset_path("xgboost")
