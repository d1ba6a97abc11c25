"""Compressed CSV and Parquet folders prepare to the same store as the plain files (issue 11, item 5)."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from data_world import tiny_world
from input_helpers import prepared, write_compressed, write_csv, write_parts, write_world
from mtfm.cli import main
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.validate import DataError


@pytest.fixture(scope="module")
def csv_world(tmp_path_factory):
    """The tiny world as read back from CSV, so every layout below holds exactly these frames."""
    raw = tiny_world(0)
    base = tmp_path_factory.mktemp("csv")
    write_world(raw, base)
    for name, df in raw.tables.items():
        (base / f"{name}.parquet").unlink()
        write_csv(df, base / f"{name}.csv")
    return base, load_directory(str(base), raw.schema, None, 0)


def _layout(csv_world, tmp_path, layout: str):
    """A copy of the CSV world with every table in ``layout``."""
    base, raw = csv_world
    d = tmp_path / layout
    shutil.copytree(base, d)
    for name, df in raw.tables.items():
        if layout in ("gzip", "zstd"):
            write_compressed(d / f"{name}.csv", layout)
        elif layout == "parquet":
            (d / f"{name}.csv").unlink()
            df.write_parquet(d / f"{name}.parquet")
        elif layout == "folder":
            (d / f"{name}.csv").unlink()
            write_parts(df, d / name, 3)
    return d


def test_every_layout_prepares_the_same_store(csv_world, tmp_path) -> None:
    base, _ = csv_world
    manifest, files = prepared(base, tmp_path / "out_csv")
    assert any(name.endswith(".parquet") for name in files)
    for layout in ("gzip", "zstd", "parquet", "folder"):
        d = _layout(csv_world, tmp_path, layout)
        m, f = prepared(d, tmp_path / f"out_{layout}")
        assert m == manifest, layout
        assert f.keys() == files.keys() and all(f[k] == files[k] for k in files), layout


def test_compressed_and_folder_tables_are_found_and_named_in_errors(csv_world, tmp_path) -> None:
    d = _layout(csv_world, tmp_path, "zstd")
    raw = load_directory(str(d), csv_world[1].schema, None, 0)
    assert raw.origins["exp_a"].endswith("exp_a.csv.zst")
    # a table given twice (compressed and folder) is ambiguous
    write_parts(raw.tables["exp_a"], d / "exp_a", 2)
    with pytest.raises(DataError, match=r"table 'exp_a' is given 2 times \(\['exp_a/', 'exp_a.csv.zst'\]\)"):
        load_directory(str(d), raw.schema, None, 0)
    shutil.rmtree(d / "exp_a")
    # a Parquet folder of a table the schema does not name is an unknown scenario
    write_parts(raw.tables["exp_b"], d / "exp_c", 2)
    with pytest.raises(DataError, match=r"\['exp_c/'\] are not tables of the schema"):
        load_directory(str(d), raw.schema, None, 0)


def test_missing_table_lists_layouts_and_near_misses(csv_world, tmp_path) -> None:
    d = _layout(csv_world, tmp_path, "gzip")
    (d / "orders.csv.gz").rename(d / "orders.csv.bz2")
    with pytest.raises(FileNotFoundError) as err:
        load_directory(str(d), csv_world[1].schema, None, 0)
    msg = str(err.value)
    assert "orders.csv.gz" in msg and "orders.csv.zst" in msg and "orders/*.parquet" in msg
    assert "table 'orders' not found; found ['orders.csv.bz2'], in no layout this source reads" in msg


def test_parquet_parts_with_different_columns_name_both_files(csv_world, tmp_path) -> None:
    d = _layout(csv_world, tmp_path, "folder")
    part = d / "clicks" / "part-00001.parquet"
    pl.read_parquet(part).drop("rid").write_parquet(part)
    with pytest.raises(DataError, match=r"part-00001.parquet: columns .* differ from those of part-00000.parquet"):
        load_directory(str(d), csv_world[1].schema, None, 0)


def test_cli_prepares_a_gzipped_directory(csv_world, tmp_path, capsys) -> None:
    d = _layout(csv_world, tmp_path, "gzip")
    args = ["prepare", "--source", "directory", "--path", str(d), "--schema", str(d / "schema.yaml"),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "manifest.json").is_file()
