"""Side tables: user and item feature tables joined onto exposure and behaviour rows by a key.

Why in the data layer and not by hand: a user who joins before ``prepare`` writes one wide
table per scenario and behaviour type, and a join that silently nulls unknown keys or
duplicates rows for a repeated key corrupts the data without a trace. Declared in the schema
(``user_table`` / ``item_table: {table, key}``, :class:`mtfm.config.SideTable`), the join runs
once in ``prepare`` and in ``build_request`` on the same code, with these rules:

* a feature column the reading table lacks is taken from its side tables (``user_table``
  first, then ``item_table``); a column the reading table has is never replaced;
* a side table that provides none of the missing feature columns is an error (a typo); when
  no feature column is missing (request candidates that carry them) nothing is joined;
* the key must be present, non-null and unique in the side table, and every key of the
  reading table must be found in it; each is an error naming the file, row and value;
* the side table's own values are validated against the features they feed before the join,
  so a bad value is named by the side table's file and row, not by an exposure row;
* the rows of the reading table keep their order (errors after the join name its rows).
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from mtfm.config import (
    CategoricalFeature,
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    SideTable,
    VectorEntryFeature,
)
from mtfm.data.raw import RawTables
from mtfm.data.validate import DataError, check_feature, sequence_tables


def _raw_columns(feature: object) -> tuple[str, ...]:
    """The raw columns a declared feature reads (a vector entry reads its vector and index)."""
    if isinstance(feature, VectorEntryFeature):
        return (feature.vector, feature.index)
    return (feature.name,)  # type: ignore[attr-defined]


def _uses(schema: DataSchema) -> dict[str, tuple[list[SideTable], list[Feature]]]:
    """Reading table -> (its side tables in join order, the features read from it)."""
    out: dict[str, tuple[list[SideTable], list[Feature]]] = {}
    for spec in schema.scenarios:
        sides = [s for s in (spec.user_table, spec.item_table) if s is not None]
        if sides:
            out[spec.table] = (sides, [f for g in spec.declared_groups.values() for f in g])
    for table, specs in sequence_tables(schema).items():
        sides = list({s.item_table.table: s.item_table for s in specs if s.item_table is not None}.values())
        if sides:
            out[table] = (sides, [f for s in specs for f in s.features])
    return out


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum))


def _check_key(df: pl.DataFrame, key: str, origin: str, what: str) -> None:
    """``key`` is a column of ``df`` without nulls."""
    if key not in df.columns:
        raise DataError(f"{origin}: missing column '{key}' ({what}); the table has {df.columns}")
    nulls = df[key].is_null()
    if nulls.any():
        raise DataError(f"{origin}: column '{key}', row {int(nulls.arg_max())}: got None; expected a key ({what})")


def _common_key_dtype(left: pl.Series, right: pl.Series, origin: str, side_origin: str) -> pl.DataType:
    """The dtype both key columns are joined as: Int64 for integers, String for text."""
    if left.dtype.is_integer() and right.dtype.is_integer():
        return pl.Int64
    if _is_text(left.dtype) and _is_text(right.dtype):
        return pl.String
    raise DataError(f"{origin}: key column '{left.name}' has dtype {left.dtype} but {side_origin} has {right.dtype}; "
                    "expected integers in both or text in both")


def _side_frame(side: SideTable, take: list[str], features: list[Feature], frames: Mapping[str, pl.DataFrame],
                side_origin: str) -> pl.DataFrame:
    """The checked ``key`` + ``take`` columns of a side table."""
    df = frames[side.table]
    _check_key(df, side.key, side_origin, "join key of a side table")
    repeated = df[side.key].is_duplicated()
    if repeated.any():
        row = int(repeated.arg_max())
        raise DataError(
            f"{side_origin}: column '{side.key}', row {row}: key {df[side.key][row]!r} appears more than once "
            f"({int(repeated.sum())} rows have repeated keys); a side table needs one row per key"
        )
    for feature in features:
        if feature.name in take and isinstance(feature, (CategoricalFeature, MultiCategoricalFeature, NumericFeature)):
            check_feature(df, feature, side_origin)
    return df.select(side.key, *take)


def join_frame(df: pl.DataFrame, origin: str, sides: list[SideTable], features: list[Feature],
               frames: Mapping[str, pl.DataFrame], origins: Mapping[str, str]) -> pl.DataFrame:
    """``df`` (one reading table) with the missing feature columns joined from ``sides``."""
    for side in sides:
        side_origin = origins.get(side.table, side.table)
        missing = [c for f in features for c in _raw_columns(f) if c not in df.columns]
        if not missing:
            break  # every feature is there already (a request whose candidates carry them)
        if side.table not in frames:
            raise DataError(f"{origin}: missing side table '{side.table}' (the schema joins it on '{side.key}')")
        available = frames[side.table].columns
        take = list(dict.fromkeys(name for name in missing if name in available))
        if not take:
            raise DataError(
                f"{side_origin}: side table '{side.table}' provides none of the feature columns {origin} lacks "
                f"(looked for {missing}; it has {available})"
            )
        _check_key(df, side.key, origin, f"join key of side table '{side.table}'")
        right = _side_frame(side, take, features, frames, side_origin)
        dtype = _common_key_dtype(df[side.key], right[side.key], origin, side_origin)
        left_key, right_key = df[side.key].cast(dtype), right[side.key].cast(dtype)
        unknown = ~left_key.is_in(right_key.implode())
        if unknown.any():
            row = int(unknown.arg_max())
            raise DataError(
                f"{origin}: column '{side.key}', row {row}: key {df[side.key][row]!r} is not in side table "
                f"{side_origin} ({int(unknown.sum())} row(s) in total have unknown keys)"
            )
        joined = (
            df.select(left_key.alias("_key"))
            .join(right.with_columns(right_key).rename({side.key: "_key"}), on="_key", how="left",
                  maintain_order="left")
            .drop("_key")
        )
        df = df.hstack(joined)
    return df


def join_side_tables(raw: RawTables, schema: DataSchema) -> RawTables:
    """``raw`` with every reading table of ``schema`` joined with its side tables."""
    if not schema.side_tables():
        return raw
    tables = dict(raw.tables)
    for table, (sides, features) in _uses(schema).items():
        if table in tables:
            tables[table] = join_frame(tables[table], raw.origin(table), sides, features, raw.tables, raw.origins)
    return RawTables(raw.schema, tables, raw.origins, dict(raw.pre_dropped), dict(raw.info))


def sides_of(schema: DataSchema, table: str) -> tuple[list[SideTable], list[Feature]]:
    """The side tables ``table`` is joined with under ``schema``, and the features read from it."""
    return _uses(schema).get(table, ([], []))
