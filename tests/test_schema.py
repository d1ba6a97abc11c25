"""Schema validation: YAML errors name file and field; tables are checked against the schema."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from data_world import tiny_schema, tiny_schema_dict, tiny_world
from mtfm.config import SchemaError, dump_schema, load_schema, schema_from_dict
from mtfm.data.raw import RawTables
from mtfm.data.store import sample_columns
from mtfm.data.validate import DataError, exposure_columns, sequence_tables, validate_raw


def _yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_invalid_field_names_file_and_dotted_path_with_scenario_name(tmp_path) -> None:
    data = tiny_schema_dict()
    data["scenarios"][1]["item_features"][0] = {"kind": "categorical", "name": "item"}  # no encoding
    path = _yaml(tmp_path, data)
    with pytest.raises(SchemaError) as err:
        load_schema(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid schema")
    assert "scenarios[B].item_features[item]" in msg and "exactly one of num_embeddings" in msg


@pytest.mark.parametrize("change, message", [
    (lambda d: d["scenarios"].append(dict(d["scenarios"][0])), "duplicate scenario names"),
    (lambda d: d.update(split={"valid_start": 5, "test_fraction": 0.2}), "either valid_start/test_start"),
    (lambda d: d.update(window=0), "window"),
    (lambda d: d["history"][0].update(max_len=0), "history[orders].max_len"),
    (lambda d: d["scenarios"][0].update(tasks=[]), "scenarios[A].tasks"),
    (lambda d: d["realtime"].append(dict(d["history"][0])), "duplicate sequence names"),
])
def test_schema_rules_fail_before_any_work(change, message) -> None:
    data = tiny_schema_dict()
    change(data)
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        schema_from_dict(data, "s.yaml")


def test_missing_schema_file_is_named(tmp_path) -> None:
    with pytest.raises(SchemaError, match="schema file not found"):
        load_schema(tmp_path / "nope.yaml")


def test_yaml_round_trip_and_restrict() -> None:
    schema = tiny_schema()
    assert schema_from_dict(schema.model_dump(mode="json")) == schema
    only_b = schema.restrict(["B"])
    assert only_b.token_groups() == ["H:orders", "H:clicks", "R:recent", "T:B"]
    assert not any(c.startswith("T.A.") for c in sample_columns(only_b))


def test_packaged_schemas_are_valid(tmp_path) -> None:
    from importlib.resources import files

    for name in ("synthetic", "movielens", "kuairand"):
        path = files("mtfm") / "configs" / f"{name}.yaml"
        schema = load_schema(str(path))
        dump_schema(schema, tmp_path / f"{name}.yaml")
        assert load_schema(tmp_path / f"{name}.yaml") == schema
        assert len(set(sample_columns(schema))) == len(sample_columns(schema))


def test_tables_shared_by_history_and_realtime_are_validated_once_per_table() -> None:
    schema = tiny_schema()
    assert {t: [s.name for s in specs] for t, specs in sequence_tables(schema).items()} == {
        "orders": ["orders"], "clicks": ["clicks", "recent"]}
    assert exposure_columns(schema, schema.scenario("A"))[:3] == ["user_id", "ts", "level"]


def test_valid_world_passes_and_each_table_is_checked_against_its_scenario() -> None:
    raw = tiny_world(0)
    validate_raw(raw)
    # Scenario B's table lacks A's columns: giving it as A's table must fail on A's features.
    swapped = RawTables(raw.schema, {**raw.tables, "exp_a": raw.tables["exp_b"]}, raw.origins)
    with pytest.raises(DataError, match=r"memory:exp_a: missing column\(s\) \['level', 'ctr_hist'"):
        validate_raw(swapped)


def test_restricted_schema_only_reads_its_own_tables() -> None:
    raw = tiny_world(0)
    broken = RawTables(raw.schema, {**raw.tables, "exp_a": raw.tables["exp_a"].drop("price")}, raw.origins)
    validate_raw(broken, raw.schema.restrict(["B"]))  # A is not prepared: its table is not read
    with pytest.raises(DataError, match="price"):
        validate_raw(broken)


def test_label_dtypes_accepted_and_rejected() -> None:
    raw = tiny_world(0)
    ok = raw.tables["exp_b"].with_columns(pl.col("click").cast(pl.Boolean))
    validate_raw(RawTables(raw.schema, {**raw.tables, "exp_b": ok}, raw.origins))
    bad = raw.tables["exp_b"].with_columns(pl.col("click").cast(pl.String))
    with pytest.raises(DataError, match="column 'click' has dtype String; expected a 0/1 label"):
        validate_raw(RawTables(raw.schema, {**raw.tables, "exp_b": bad}, raw.origins))
