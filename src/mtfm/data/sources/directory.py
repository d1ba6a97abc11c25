"""A generic source: a directory of ``<table>.parquet`` or ``<table>.csv`` files plus a schema.

Usage: ``mtfm prepare --source directory --path DIR --schema schema.yaml --out OUT``.

Every table the schema names (each scenario's exposure table, each behaviour table) must be
one file ``DIR/<table>.parquet`` or ``DIR/<table>.csv`` (not both). A ``.parquet`` / ``.csv``
file whose name the schema does not mention is an error (it is most likely the exposure table
of a scenario missing from the schema); other files are ignored.

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

SUFFIXES = (".parquet", ".csv")


def _table_files(directory: Path, schema: DataSchema) -> dict[str, Path]:
    wanted = list(dict.fromkeys([s.table for s in schema.scenarios] + list(sequence_tables(schema))))
    present = {p.stem: p for p in sorted(directory.iterdir()) if p.suffix in SUFFIXES and p.is_file()}
    unknown = sorted(p.name for stem, p in present.items() if stem not in wanted)
    if unknown:
        raise DataError(
            f"{directory}: file(s) {unknown} are not tables of the schema (unknown scenario?); the schema "
            f"names {wanted}"
        )
    found: dict[str, Path] = {}
    for table in wanted:
        candidates = [directory / f"{table}{suffix}" for suffix in SUFFIXES]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            raise FileNotFoundError(f"{candidates[0]} (or {candidates[1].name}): table '{table}' not found")
        if len(existing) > 1:
            raise DataError(f"{directory}: both {existing[0].name} and {existing[1].name} exist; keep one")
        found[table] = existing[0]
    return found


def _list_columns(schema: DataSchema, table: str) -> list[str]:
    """Multi-categorical columns of ``table`` (written ``a|b|c`` in CSV)."""
    names = []
    for s in schema.scenarios:
        if s.table == table:
            names += [f.name for g in s.feature_groups.values() for f in g if isinstance(f, MultiCategoricalFeature)]
    for seq in [*schema.history, *schema.realtime]:
        if seq.table == table:
            names += [f.name for f in seq.features if isinstance(f, MultiCategoricalFeature)]
    return list(dict.fromkeys(names))


def read_table(path: Path, list_columns: list[str]) -> pl.DataFrame:
    """Read one table file; CSV list columns are split on ``|`` (integers when all parse)."""
    try:
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
        raise ValueError("--source directory needs --path DIR (a directory of <table>.parquet / <table>.csv files)")
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
