"""Vector features -> the numeric columns prepare stores (:class:`mtfm.config.VectorFeature`,
:class:`mtfm.config.VectorEntryFeature`).

Why expand into columns instead of storing lists: the encoder, the store, the loader and the
model already handle numeric features, each with train-split statistics; component ``i`` of a
vector ``v`` becomes the numeric column ``v[i]`` and goes down that path unchanged. The
expansion runs once per table in ``prepare`` and ``build_request`` (so requests get the same
inputs), as polars list expressions (no per-row Python).

A vector column may be a Parquet list / fixed-size list of numbers, or text with the values
joined by ``|`` (CSV). Every row must hold exactly ``dim`` numbers (``vector``), or enough for
its index (``vector_entry``); a null vector, a wrong length, an element that is not a number
or an index outside the vector is an error naming the file, column, row and value. Whether
the numbers are finite is checked with the other numeric features, per component column.
"""

from __future__ import annotations

import polars as pl

from mtfm.config import DataSchema, ScenarioSpec, VectorEntryFeature, VectorFeature
from mtfm.data.raw import RawTables
from mtfm.data.validate import DataError, require_columns


def _fail_at(origin: str, column: str, bad: pl.Series, values: pl.Series, expected: str) -> None:
    """Raise for the first True row of ``bad``, showing the row's raw value."""
    bad = bad.fill_null(True)
    if bad.any():
        row = int(bad.arg_max())
        value = values[row]
        shown = value.to_list() if isinstance(value, pl.Series) else value
        raise DataError(f"{origin}: column '{column}', row {row}: got {shown!r}; expected {expected} "
                        f"({int(bad.sum())} bad row(s) in this column)")


def _float_lists(s: pl.Series, origin: str) -> pl.Series:
    """A vector column as List(Float64): lists and arrays of numbers, or ``|``-joined text."""
    if isinstance(s.dtype, pl.Array):
        s = s.arr.to_list()
    original = s  # errors show the cell as the user wrote it
    if s.dtype == pl.String:
        s = s.str.split("|")
    if not isinstance(s.dtype, pl.List):
        raise DataError(f"{origin}: column '{s.name}' has dtype {s.dtype}; expected a list of numbers "
                        "(Parquet list, or text with the values joined by '|')")
    _fail_at(origin, s.name, s.is_null(), original, "a list of numbers (nulls are not allowed)")
    if s.dtype.inner == pl.String:  # type: ignore[union-attr]
        parsed = s.list.eval(pl.element().str.strip_chars().cast(pl.Float64, strict=False))
        bad = parsed.list.eval(pl.element().is_null()).list.any() & s.list.len().gt(0)
        _fail_at(origin, s.name, bad, original, "a list of numbers (an element is not a number)")
        return parsed
    inner = s.dtype.inner  # type: ignore[union-attr]
    if not (inner.is_integer() or inner.is_float()):
        raise DataError(f"{origin}: column '{s.name}' has dtype {s.dtype}; expected a list of numbers")
    _fail_at(origin, s.name, s.list.eval(pl.element().is_null()).list.any(), s, "a list without null elements")
    return s.cast(pl.List(pl.Float64))


def _expand_vector(df: pl.DataFrame, f: VectorFeature, origin: str) -> list[pl.Series]:
    values = _float_lists(df[f.name], origin)
    _fail_at(origin, f.name, values.list.len() != f.dim, df[f.name], f"a list of exactly {f.dim} numbers (dim)")
    parts = values.to_frame().select([pl.col(f.name).list.get(i).alias(c.name) for i, c in enumerate(f.components())])
    return parts.get_columns()


def _vector_entry(df: pl.DataFrame, f: VectorEntryFeature, origin: str) -> pl.Series:
    values = _float_lists(df[f.vector], origin)
    index = df[f.index]
    if not index.dtype.is_integer():
        raise DataError(f"{origin}: column '{f.index}' has dtype {index.dtype}; expected integer positions into "
                        f"'{f.vector}' (vector_entry feature '{f.name}')")
    _fail_at(origin, f.index, (index < 0) | (index >= values.list.len()), index,
             f"a position in [0, length of '{f.vector}') (vector_entry feature '{f.name}')")
    return values.list.get(index, null_on_oob=False).alias(f.name)


def expand_frame(df: pl.DataFrame, spec: ScenarioSpec, origin: str) -> pl.DataFrame:
    """``df`` (the exposure table of ``spec``) plus the columns of its vector features."""
    vectors = spec.vector_features()
    if not vectors:
        return df
    raw_columns = [c for f in vectors for c in ((f.name,) if isinstance(f, VectorFeature) else (f.vector, f.index))]
    require_columns(df, raw_columns, origin, f"vector features of scenario '{spec.name}'")
    new: list[pl.Series] = []
    for f in vectors:
        new += _expand_vector(df, f, origin) if isinstance(f, VectorFeature) else [_vector_entry(df, f, origin)]
    return df.with_columns(new)


def expand_vectors(raw: RawTables, schema: DataSchema) -> RawTables:
    """``raw`` with every scenario's vector feature columns derived."""
    if not any(s.vector_features() for s in schema.scenarios):
        return raw
    tables = dict(raw.tables)
    for spec in schema.scenarios:
        if spec.table in tables:
            tables[spec.table] = expand_frame(tables[spec.table], spec, raw.origin(spec.table))
    return RawTables(raw.schema, tables, raw.origins, dict(raw.pre_dropped), dict(raw.info))
