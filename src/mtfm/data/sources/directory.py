"""A generic source: a directory holding one file (or Parquet folder) per table plus a schema.

Usage: ``mtfm prepare --source directory --path DIR --schema schema.yaml --out OUT``.

Every table the schema names (each scenario's exposure table, each behaviour table) must be
exactly one of (:data:`LAYOUTS`):

* ``DIR/<table>.parquet``;
* ``DIR/<table>.csv``, ``DIR/<table>.csv.gz`` or ``DIR/<table>.csv.zst`` (compressed CSV is
  decompressed by polars while reading; the table is the same as the plain ``.csv``);
* ``DIR/<table>/`` holding ``*.parquet`` parts (``part-00000.parquet``, ..., the layout
  ``python -m mtfm.data.sources.synthetic`` writes), read in file-name order as one table;
  rows are numbered across the parts in that order, and a part whose columns differ from the
  first part's is an error naming both files.

A file or Parquet folder in one of these layouts whose table name the schema does not mention
is an error (it is most likely the exposure table of a scenario missing from the schema);
other files are ignored. A missing table's error lists every layout looked for and any file
that starts with the table's name but has a layout that is not read (``exp_a.csv.bz2``).

CSV files need a header line; column types are inferred from the whole file. A
multi-categorical column is written in CSV as its values joined by ``|`` (``3|7|12``; an empty
field is an empty list). Errors name rows as 0-based data rows: CSV line = row + 2.

``--users N`` keeps the N users with the smallest ids (over the exposure tables); the
exposures of the other users are reported as dropped (``user_not_selected``) so the
accounting of ``mtfm prepare`` stays exact. The directory is read as is, so ``--seed`` has no
effect here.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mtfm.config import DataSchema, MultiCategoricalFeature
from mtfm.data.raw import RawTables
from mtfm.data.validate import DataError, sequence_tables

# File name endings read as one table file; a Parquet folder is ``<table>/`` (see the docstring).
FILE_LAYOUTS: tuple[str, ...] = (".parquet", ".csv", ".csv.gz", ".csv.zst")
LAYOUTS: tuple[str, ...] = (*FILE_LAYOUTS, "/*.parquet")


def _table_name(path: Path) -> str | None:
    """The table a directory entry holds, or None when it is in no layout this source reads."""
    if path.is_dir():
        return path.name if any(p.is_file() for p in path.glob("*.parquet")) else None
    for ending in FILE_LAYOUTS:
        if path.is_file() and path.name.endswith(ending) and len(path.name) > len(ending):
            return path.name[: -len(ending)]
    return None


def _not_found(directory: Path, table: str) -> FileNotFoundError:
    """The error for a missing table: every layout looked for, and near misses by name."""
    looked = [f"{table}{ending}" for ending in FILE_LAYOUTS] + [f"{table}/*.parquet"]
    near = sorted(p.name for p in directory.iterdir() if p.name.startswith(table) and _table_name(p) is None)
    hint = f"; found {near}, in no layout this source reads" if near else ""
    return FileNotFoundError(
        f"{directory / looked[0]} (or {', '.join(looked[1:])}): table '{table}' not found{hint}"
    )


def _table_files(directory: Path, schema: DataSchema) -> dict[str, Path]:
    """Table name -> its file or Parquet folder; unknown tables and ambiguous layouts are errors."""
    wanted = list(dict.fromkeys([s.table for s in schema.scenarios] + list(sequence_tables(schema))
                                + list(schema.side_tables())))
    present: dict[str, list[Path]] = {}
    for entry in sorted(directory.iterdir()):
        name = _table_name(entry)
        if name is not None:
            present.setdefault(name, []).append(entry)
    unknown = sorted(p.name + ("/" if p.is_dir() else "") for name, paths in present.items() if name not in wanted
                     for p in paths)
    if unknown:
        raise DataError(
            f"{directory}: file(s) {unknown} are not tables of the schema (unknown scenario?); the schema "
            f"names {wanted}"
        )
    found: dict[str, Path] = {}
    for table in wanted:
        existing = present.get(table, [])
        if not existing:
            raise _not_found(directory, table)
        if len(existing) > 1:
            names = [p.name + ("/" if p.is_dir() else "") for p in existing]
            raise DataError(f"{directory}: table '{table}' is given {len(existing)} times ({names}); keep one")
        found[table] = existing[0]
    return found


def _list_columns(schema: DataSchema, table: str) -> list[str]:
    """Multi-categorical columns of ``table`` (written ``a|b|c`` in CSV); a side table's are
    those of the scenarios and sequences that join it."""
    names = []
    for s in schema.scenarios:
        if table in (s.table, *[side.table for side in (s.user_table, s.item_table) if side is not None]):
            names += [f.name for g in s.feature_groups.values() for f in g if isinstance(f, MultiCategoricalFeature)]
    for seq in [*schema.history, *schema.realtime]:
        if seq.table == table or (seq.item_table is not None and seq.item_table.table == table):
            names += [f.name for f in seq.features if isinstance(f, MultiCategoricalFeature)]
    return list(dict.fromkeys(names))


def _read_parquet_folder(folder: Path) -> pl.DataFrame:
    """The ``*.parquet`` parts of ``folder`` in name order, as one table; every part must
    carry the first part's columns (a different set would silently null-fill a column)."""
    parts = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    frames = [pl.read_parquet(p) for p in parts]
    for part, frame in zip(parts[1:], frames[1:]):
        if frame.columns != frames[0].columns:
            raise DataError(
                f"{part}: columns {frame.columns} differ from those of {parts[0].name} {frames[0].columns}; "
                f"every part of {folder} must have the same columns"
            )
    try:
        # One chunk, as one file would give: float sums (train-split means of numeric
        # features) add in chunk order, so several chunks could differ in the last bit.
        return pl.concat(frames, how="vertical", rechunk=True)
    except pl.exceptions.PolarsError as err:
        raise DataError(f"{folder}: its parts do not stack into one table (column dtypes differ?): {err}") from None


def read_table(path: Path, list_columns: list[str]) -> pl.DataFrame:
    """Read one table (a file or Parquet folder); CSV list columns are split on ``|``
    (integers when all parse)."""
    try:
        if path.is_dir():
            return _read_parquet_folder(path)
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        df = pl.read_csv(path, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{path}: cannot be read: {err}") from None
    for col in [c for c in list_columns if c in df.columns]:
        text = df[col].cast(pl.String).fill_null("")
        parts = text.str.split("|").list.eval(pl.element().filter(pl.element() != ""))
        elements = parts.explode(empty_as_null=True).drop_nulls()
        all_int = elements.cast(pl.Int64, strict=False).null_count() == 0
        df = df.with_columns((parts.cast(pl.List(pl.Int64)) if all_int else parts).alias(col))
    return df


def _select_users(tables: dict[str, pl.DataFrame], schema: DataSchema, users: int) -> tuple[dict, int]:
    """Keep the ``users`` smallest user ids; return the tables and the exposures removed."""
    col = schema.user_column
    exposure_tables = [s.table for s in schema.scenarios]
    ids = pl.concat([tables[t][col].cast(pl.Int64) for t in exposure_tables]).unique().sort()
    kept = ids.head(users)
    removed = 0
    out = {}
    for name, df in tables.items():
        filtered = df.filter(pl.col(col).is_in(kept.implode()))
        if name in exposure_tables:
            removed += len(df) - len(filtered)
        out[name] = filtered
    return out, removed


def load_source(path: str | None, schema: DataSchema | None, users: int | None, seed: int) -> RawTables:
    """Read ``path``'s tables for ``schema`` (see the module docstring)."""
    if path is None:
        raise ValueError("--source directory needs --path DIR (a directory of <table>.parquet / .csv / .csv.gz / "
                         ".csv.zst files or <table>/*.parquet folders)")
    if schema is None:
        raise ValueError("--source directory needs --schema YAML (the directory holds no default schema)")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: directory not found")
    files = _table_files(directory, schema)
    tables = {t: read_table(p, _list_columns(schema, t)) for t, p in files.items()}
    pre_dropped: dict[str, int] = {}
    if users is not None:
        if users < 1:
            raise ValueError(f"--users must be >= 1, got {users}")
        missing = [s.table for s in schema.scenarios if schema.user_column not in tables[s.table].columns]
        if missing:
            raise DataError(f"{files[missing[0]]}: missing column '{schema.user_column}' (user column)")
        tables, removed = _select_users(tables, schema, users)
        pre_dropped["user_not_selected"] = removed
    return RawTables(
        schema=schema,
        tables=tables,
        origins={t: str(p) for t, p in files.items()},
        pre_dropped=pre_dropped,
        info={"source": "directory", "path": str(directory.resolve()), "users": users},
    )
