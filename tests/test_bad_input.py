"""The bad-input matrix: each case is a clear error (file, column, row, expected) or a counted drop."""

from __future__ import annotations

import polars as pl
import pytest

from data_world import tiny_schema, tiny_schema_dict, tiny_world
from mtfm.cli import main
from mtfm.config import SchemaError, dump_schema, schema_from_dict
from mtfm.data.aggregate import prepare
from mtfm.data.raw import RawTables
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.validate import DataError


def _with(raw: RawTables, table: str, df: pl.DataFrame) -> RawTables:
    return RawTables(raw.schema, {**raw.tables, table: df}, raw.origins, dict(raw.pre_dropped))


def _set(df: pl.DataFrame, column: str, row: int, value: object, dtype: pl.DataType | None = None) -> pl.DataFrame:
    s = df[column].to_list()
    s[row] = value
    return df.with_columns(pl.Series(column, s, dtype=dtype or df[column].dtype, strict=False))


def _write_dir(raw: RawTables, path, csv: tuple[str, ...] = ()) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, df in raw.tables.items():
        if name in csv:
            as_text = pl.col(pl.List(pl.Int64)).cast(pl.List(pl.String)).list.join("|")
            df.with_columns(as_text).write_csv(path / f"{name}.csv")
        else:
            df.write_parquet(path / f"{name}.parquet")
    dump_schema(raw.schema, path / "schema.yaml")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_file_names_the_expected_path(tmp_path) -> None:
    raw = tiny_world(0)
    _write_dir(raw, tmp_path / "d")
    (tmp_path / "d" / "orders.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"orders\.parquet \(or orders\.csv, orders\.csv\.gz, orders\.csv\.zst, orders/\*\.parquet\): table .orders. not found"):
        load_directory(str(tmp_path / "d"), raw.schema, None, 0)


def test_missing_column_names_file_and_column(tmp_path) -> None:
    raw = tiny_world(0)
    with pytest.raises(DataError, match=r"memory:exp_b: missing column\(s\) \['score'\]"):
        prepare(_with(raw, "exp_b", raw.tables["exp_b"].drop("score")), tmp_path)


def test_wrong_dtype_names_column_dtype_and_expectation(tmp_path) -> None:
    raw = tiny_world(0)
    bad = raw.tables["exp_a"].with_columns(pl.col("price").cast(pl.String))
    with pytest.raises(DataError, match=r"memory:exp_a: column 'price' has dtype String; expected a number"):
        prepare(_with(raw, "exp_a", bad), tmp_path)


def test_null_in_required_field_names_the_row(tmp_path) -> None:
    raw = tiny_world(0)
    bad = _set(raw.tables["exp_b"], "item", 7, None)
    with pytest.raises(DataError, match=r"memory:exp_b: column 'item', row 7: got None; .*nulls are not allowed"):
        prepare(_with(raw, "exp_b", bad), tmp_path)


def test_null_label_is_an_error_unless_the_task_allows_missing(tmp_path) -> None:
    raw = tiny_world(0)
    bad = _set(raw.tables["exp_a"], "click", 4, None)
    with pytest.raises(DataError, match=r"column 'click', row 4: got None; expected a 0/1 label"):
        prepare(_with(raw, "exp_a", bad), tmp_path)
    # "buy" belongs only to ctcvr, which allows missing labels: nulls there are fine (masked).
    assert raw.tables["exp_a"]["buy"].null_count() > 0
    prepare(raw, tmp_path / "ok")


def test_label_outside_zero_one_names_the_row(tmp_path) -> None:
    raw = tiny_world(0)
    bad = _set(raw.tables["exp_b"], "click", 12, 2)
    with pytest.raises(DataError, match=r"column 'click', row 12: got 2; expected a label in \{0, 1\}"):
        prepare(_with(raw, "exp_b", bad), tmp_path)


def test_categorical_id_out_of_range_names_the_row(tmp_path) -> None:
    raw = tiny_world(0)
    bad = _set(raw.tables["exp_b"], "item", 3, 50)
    with pytest.raises(DataError, match=r"column 'item', row 3: got 50; expected an id in \[0, 50\)"):
        prepare(_with(raw, "exp_b", bad), tmp_path)
    tags = raw.tables["exp_a"]["tags"].to_list()
    tags[9] = [1, 8]
    bad = raw.tables["exp_a"].with_columns(pl.Series("tags", tags, dtype=pl.List(pl.Int64)))
    with pytest.raises(DataError, match=r"column 'tags', row 9: got \[1, 8\] \(element 8\)"):
        prepare(_with(raw, "exp_a", bad), tmp_path)


def test_negative_timestamp_is_an_error(tmp_path) -> None:
    raw = tiny_world(0)
    bad = _set(raw.tables["clicks"], "ts", 5, -30)
    with pytest.raises(DataError, match=r"memory:clicks: column 'ts', row 5: got -30; expected a non-negative"):
        prepare(_with(raw, "clicks", bad), tmp_path)


def test_numeric_nan_and_log1p_domain_are_errors(tmp_path) -> None:
    raw = tiny_world(0)
    with pytest.raises(DataError, match=r"column 'score', row 2: got nan; .*NaN is not allowed"):
        prepare(_with(raw, "exp_b", _set(raw.tables["exp_b"], "score", 2, float("nan"))), tmp_path)
    with pytest.raises(DataError, match=r"column 'price', row 6: got -3.0; expected a value > -1 after clipping"):
        prepare(_with(raw, "exp_a", _set(raw.tables["exp_a"], "price", 6, -3.0)), tmp_path)


def test_unknown_scenario_on_the_command_line_or_as_a_table(tmp_path) -> None:
    raw = tiny_world(0)
    with pytest.raises(SchemaError, match=r"unknown scenario\(s\) \['C'\]"):
        prepare(raw, tmp_path, scenarios=["A", "C"])
    extra = RawTables(raw.schema, {**raw.tables, "exp_c": raw.tables["exp_b"]}, {**raw.origins, "exp_c": "x/exp_c.csv"})
    with pytest.raises(DataError, match=r"'exp_c' \(from x/exp_c.csv\) are not named by the schema: unknown scenario"):
        prepare(extra, tmp_path)
    _write_dir(raw, tmp_path / "d")
    raw.tables["exp_b"].write_parquet(tmp_path / "d" / "exp_c.parquet")
    with pytest.raises(DataError, match=r"\['exp_c.parquet'\] are not tables of the schema"):
        load_directory(str(tmp_path / "d"), raw.schema, None, 0)


def test_missing_table_is_an_error(tmp_path) -> None:
    raw = tiny_world(0)
    tables = {k: v for k, v in raw.tables.items() if k != "clicks"}
    with pytest.raises(DataError, match=r"missing table\(s\) \['clicks'\]"):
        prepare(RawTables(raw.schema, tables, raw.origins), tmp_path)


# --------------------------------------------------------------------------------------------
# Counted drops and documented policies
# --------------------------------------------------------------------------------------------


def test_timestamp_outside_the_schema_range_is_dropped_and_counted(tmp_path) -> None:
    raw = tiny_world(0)
    ts = pl.concat([raw.tables[t]["ts"] for t in ("exp_a", "exp_b")])
    lo, hi = int(ts.quantile(0.1)), int(ts.quantile(0.9))
    schema = schema_from_dict({**tiny_schema_dict(), "time": {"column": "ts", "unit": "s", "min": lo, "max": hi}})
    raw = RawTables(schema, raw.tables, raw.origins)
    outside = sum(int(((raw.tables[t]["ts"] < lo) | (raw.tables[t]["ts"] >= hi)).sum()) for t in ("exp_a", "exp_b"))
    m = prepare(raw, tmp_path)
    assert m.dropped == {"timestamp_out_of_range": outside} and outside > 0
    assert m.input_exposures == m.output_exposures + outside


def test_exact_duplicate_exposures_are_dropped_keeping_the_first(tmp_path) -> None:
    raw = tiny_world(0)
    a = raw.tables["exp_a"]
    dup = pl.concat([a, a[[3, 10, 10]]])  # rows 3 and 10 again (10 twice)
    near = a[[5]].with_columns(pl.lit(0.123).alias("ctr_hist"))  # same user/ts, one column differs: kept
    m = prepare(_with(raw, "exp_a", pl.concat([dup, near])), tmp_path)
    assert m.dropped == {"duplicate_exposure": 3}
    assert m.output_exposures == len(a) + 1 + len(raw.tables["exp_b"])
    assert m.input_exposures == m.output_exposures + 3


def test_user_with_only_behaviour_rows_gets_no_sample_and_is_counted(tmp_path) -> None:
    raw = tiny_world(0)  # orders carry one row of user 999999, who has no exposure
    m = prepare(raw, tmp_path)
    assert m.users_without_exposures == 1
    assert "users_without_exposures" not in m.dropped


def test_source_pre_dropped_counts_are_merged_into_the_accounting(tmp_path) -> None:
    raw = tiny_world(0)
    raw.pre_dropped = {"no_genre_family": 5, "duplicate_exposure": 2}
    m = prepare(_with(raw, "exp_b", pl.concat([raw.tables["exp_b"], raw.tables["exp_b"][[0]]])), tmp_path)
    assert m.dropped == {"no_genre_family": 5, "duplicate_exposure": 3}
    assert m.input_exposures == m.output_exposures + 8


# --------------------------------------------------------------------------------------------
# Through the command line and the directory source
# --------------------------------------------------------------------------------------------


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys) -> None:
    raw = tiny_world(0)
    _write_dir(RawTables(raw.schema, {**raw.tables, "exp_b": _set(raw.tables["exp_b"], "click", 1, 5)}, raw.origins),
               tmp_path / "d", csv=("exp_b",))
    code = main(["prepare", "--source", "directory", "--path", str(tmp_path / "d"), "--schema",
                 str(tmp_path / "d" / "schema.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "exp_b.csv: column 'click', row 1: got 5; expected a label in {0, 1}" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_prepares_a_directory_of_csv_and_parquet_and_prints_the_summary(tmp_path, capsys) -> None:
    raw = tiny_world(0)
    _write_dir(raw, tmp_path / "d", csv=("exp_a", "clicks"))
    args = ["prepare", "--source", "directory", "--path", str(tmp_path / "d"), "--schema",
            str(tmp_path / "d" / "schema.yaml"), "--out", str(tmp_path / "out"), "--quiet", "--users", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "drop reasons:" in out and "user_not_selected" in out
    assert main(args) == 2  # the output exists: refuse to mix runs
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_prepare_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    for option in ("--source", "--path", "--schema", "--users", "--seed", "--out", "--scenarios", "--shards",
                   "--max-shard-rows", "--oracle-splits", "--overwrite", "--quiet"):
        assert option in text
    for policy in ("timestamp_out_of_range", "duplicate_exposure", "users_without_exposures",
                   "input_exposures == output_exposures + sum(dropped)"):
        assert policy in text


def test_tiny_schema_is_valid() -> None:
    assert tiny_schema().scenario_names == ["A", "B"]
