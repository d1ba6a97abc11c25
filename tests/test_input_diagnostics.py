"""Diagnostics that name the cause (issue 11, item 9): stray CSV cells, empty splits, far timestamps."""

from __future__ import annotations

import polars as pl
import pytest

from data_world import tiny_schema_dict, tiny_world
from input_helpers import write_csv, write_world
from mtfm.config import schema_from_dict
from mtfm.data.aggregate import prepare
from mtfm.data.raw import RawTables
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.validate import DataError


def _csv_with_cell(tmp_path, table: str, column: str, row: int, text: str):
    """The tiny world as CSV files, one cell of ``table`` replaced by ``text``."""
    raw = tiny_world(0)
    write_world(raw, tmp_path)
    df = raw.tables[table]
    cells = df[column].cast(pl.String).to_list()
    cells[row] = text
    (tmp_path / f"{table}.parquet").unlink()
    write_csv(df.with_columns(pl.Series(column, cells)), tmp_path / f"{table}.csv")
    return load_directory(str(tmp_path), raw.schema, None, 0)


@pytest.mark.parametrize("table, column, row, text, expected", [
    ("exp_a", "price", 6, "n/a", "a number"),
    ("exp_b", "click", 11, "yes", "a 0/1 label"),
    ("orders", "user_id", 3, "u-17", "an integer user id"),
    ("exp_b", "item", 0, "12b", r"integer ids in \[0, 50\)"),
])
def test_a_stray_csv_cell_is_named_with_row_and_value(tmp_path, table, column, row, text, expected) -> None:
    raw = _csv_with_cell(tmp_path, table, column, row, text)
    with pytest.raises(DataError, match=rf"{table}\.csv: column '{column}', row {row}: got '{text}'; expected "
                                        rf"{expected}.*1 row\(s\) of this column are not numbers"):
        prepare(raw, tmp_path / "out")


def _with_split(split: dict) -> RawTables:
    raw = tiny_world(0)
    return RawTables(schema_from_dict(tiny_schema_dict(split=split), "s.yaml"), raw.tables, raw.origins)


@pytest.mark.parametrize("split, empty", [
    ({"valid_start": 5000, "test_start": 6000}, "valid"),
    ({"valid_start": 1200, "test_start": 9000}, "test"),
    ({"valid_start": 100, "test_start": 1300}, "train"),
])
def test_an_empty_split_names_boundaries_and_data_range(split, empty, tmp_path) -> None:
    with pytest.raises(DataError, match=rf"split '{empty}' is empty: boundaries valid_start={split['valid_start']}, "
                                        rf"test_start={split['test_start']} vs data range \[1000, 1600\)"):
        prepare(_with_split(split), tmp_path)


def test_an_empty_valid_split_by_design_is_allowed(tmp_path) -> None:
    m = prepare(_with_split({"valid_start": 1300, "test_start": 1300}), tmp_path)
    assert m.splits["valid"].samples == 0 and m.splits["test"].samples > 0


def test_far_timestamps_are_warned_about_with_counts(tmp_path) -> None:
    tiny = tiny_world(0)
    t0 = 1_700_000_000  # a real clock: 2023-11-14
    raw = RawTables(tiny.schema, {n: df.with_columns(pl.col("ts") + t0) for n, df in tiny.tables.items()},
                    tiny.origins)
    ts = raw.tables["exp_a"]["ts"].to_list()
    ts[8], ts[20] = t0 + 10 * 365 * 86_400, 0  # a year typed wrong, a clock default
    far = RawTables(raw.schema, {**raw.tables, "exp_a": raw.tables["exp_a"].with_columns(pl.Series("ts", ts))},
                    raw.origins)
    with pytest.warns(UserWarning, match=r"memory:exp_a: column 'ts': 2 row\(s\) lie far outside the bulk of the "
                                         r"timestamps \[1700001003 \(2023-11-14 22:30:03 UTC\), .*\] \(1 before, "
                                         r"1 after; first: row 8 = 2015360000 \(2033-11-11 .*\); they are kept"):
        m = prepare(far, tmp_path / "far")
    assert m.input_exposures == m.output_exposures  # kept, as the warning says
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(raw, tmp_path / "plain")  # the tiny world itself has no far timestamps
