"""Checks of raw tables against the schema, before any aggregation work starts.

Why a separate pass: aggregation reorders rows, so a problem found later could no longer be
reported with the row the user has to fix. Every check here runs on the tables exactly as the
source handed them over, and every error names the table's origin (file), the column, the
first offending row (0-based data row, header excluded), the value found, what was expected and
how many rows in total have the problem.

Errors (never silently fixed):

* a table the schema names is missing, or a table is present that the schema does not name
  (for instance the exposure table of a scenario that is not in the schema);
* a required column is missing, or has the wrong dtype;
* a null (or NaN) in a required field: user, timestamp, every feature, every label of a task
  without ``allow_missing``;
* a negative timestamp;
* a label outside {0, 1};
* a categorical id outside ``[0, num_embeddings)``;
* a numeric value that is infinite, or outside the domain of ``log1p`` (after clipping);
* an oracle probability outside [0, 1] (a null oracle means "unknown" and is allowed).

What is *not* an error but a counted drop (duplicate exposure rows, exposures outside
``[time.min, time.max)``) is handled by :mod:`mtfm.data.aggregate`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from mtfm.config import (
    CategoricalFeature,
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    ScenarioSpec,
    SequenceSpec,
)
from mtfm.data.raw import RawTables


class DataError(ValueError):
    """Bad input data; the message names file, column, row and what was expected."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _fail(origin: str, column: str, bad: pl.Series, values: pl.Series, expected: str) -> None:
    """Raise a DataError for the first True row of ``bad`` (if any)."""
    bad = bad.fill_null(False)
    if not bad.any():
        return
    row = int(bad.arg_max())  # first True
    total = int(bad.sum())
    raise DataError(
        f"{origin}: column '{column}', row {row}: got {values[row]!r}; expected {expected} "
        f"({total} bad row(s) in this column)"
    )


def _dtype_error(origin: str, column: str, dtype: pl.DataType, expected: str,
                 values: pl.Series | None = None) -> DataError:
    """A wrong-dtype error; for a text column where a number was expected, the first cell
    that is not a number is named with its row: a CSV column with one stray cell ("n/a",
    "1,5") is read as text as a whole, and the dtype alone would not tell the user where."""
    if values is not None and _is_text(dtype):
        text = values.cast(pl.String)
        bad = text.str.strip_chars().cast(pl.Float64, strict=False).is_null() & text.is_not_null()
        if bad.any():
            row = int(bad.arg_max())
            return DataError(
                f"{origin}: column '{column}', row {row}: got {text[row]!r}; expected {expected} "
                f"({int(bad.sum())} row(s) of this column are not numbers, so the whole column was read as "
                f"text, dtype {dtype})"
            )
    return DataError(f"{origin}: column '{column}' has dtype {dtype}; expected {expected}")


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum))


# --------------------------------------------------------------------------------------------
# Column checks
# --------------------------------------------------------------------------------------------


def require_columns(df: pl.DataFrame, columns: Iterable[str], origin: str, what: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing} ({what}); the table has {df.columns}")


def check_not_null(df: pl.DataFrame, column: str, origin: str, expected: str) -> None:
    s = df[column]
    if s.null_count():
        _fail(origin, column, s.is_null(), s, f"{expected} (nulls are not allowed here)")
    if s.dtype.is_float():
        _fail(origin, column, s.is_nan(), s, f"{expected} (NaN is not allowed here)")


def check_user_column(df: pl.DataFrame, column: str, origin: str) -> None:
    dtype = df[column].dtype
    if not dtype.is_integer():
        raise _dtype_error(origin, column, dtype, "an integer user id", df[column])
    check_not_null(df, column, origin, "an integer user id")


def check_time_column(df: pl.DataFrame, column: str, origin: str, unit: str) -> None:
    s = df[column]
    if not s.dtype.is_integer():
        raise _dtype_error(origin, column, s.dtype, f"an integer timestamp in unit '{unit}', a datetime or "
                           "ISO-8601 text")
    check_not_null(df, column, origin, f"an integer timestamp in unit '{unit}'")
    if s.dtype.is_signed_integer() and len(s) and s.min() < 0:  # type: ignore[operator]
        _fail(origin, column, s < 0, s, f"a non-negative timestamp in unit '{unit}'")


def check_label_column(df: pl.DataFrame, column: str, origin: str, allow_missing: bool) -> None:
    s = df[column]
    if not (s.dtype.is_integer() or s.dtype.is_float() or s.dtype == pl.Boolean):
        raise _dtype_error(origin, column, s.dtype, "a 0/1 label (integer or boolean)", s)
    if not allow_missing:
        check_not_null(df, column, origin, "a 0/1 label (the task does not allow missing labels)")
    if s.dtype == pl.Boolean or len(s) == 0:
        return
    if s.dtype.is_float():
        # NaN reaches here only when the task allows missing labels: it then means "missing".
        _fail(origin, column, s.is_not_nan() & ~s.is_in([0.0, 1.0]), s, "a label in {0, 1}")
        return
    lo, hi = s.min(), s.max()
    if lo is not None and (lo < 0 or hi > 1):  # type: ignore[operator]
        _fail(origin, column, (s < 0) | (s > 1), s, "a label in {0, 1}")


def check_oracle_column(df: pl.DataFrame, column: str, origin: str) -> None:
    s = df[column]
    if not (s.dtype.is_float() or s.dtype.is_integer()):
        raise _dtype_error(origin, column, s.dtype, "a probability in [0, 1] (float)", s)
    _fail(origin, column, (s < 0) | (s > 1), s, "a probability in [0, 1] (null or NaN = unknown)")


def _id_dtype_ok(dtype: pl.DataType, feature: CategoricalFeature | MultiCategoricalFeature) -> str | None:
    """None when ``dtype`` suits the feature's encoding, else what was expected."""
    if feature.num_embeddings is not None:
        return None if dtype.is_integer() else f"integer ids in [0, {feature.num_embeddings})"
    if dtype.is_integer() or _is_text(dtype):
        return None
    return f"integer or text values ({'vocabulary' if feature.vocabulary is not None else 'hash_buckets'} encoding)"


def _out_of_range(values: pl.Series, feature: CategoricalFeature | MultiCategoricalFeature) -> pl.Series | None:
    """Mask of ids outside [0, num_embeddings), or None when all are inside (or not applicable)."""
    if feature.num_embeddings is None or len(values) == 0:
        return None
    lo, hi = values.min(), values.max()
    if lo >= 0 and hi < feature.num_embeddings:  # type: ignore[operator]
        return None
    return (values < 0) | (values >= feature.num_embeddings)


def check_feature(df: pl.DataFrame, feature: Feature, origin: str) -> None:
    col = feature.name
    s = df[col]
    if isinstance(feature, NumericFeature):
        if not (s.dtype.is_integer() or s.dtype.is_float()):
            raise _dtype_error(origin, col, s.dtype, "a number (numeric feature)", s)
        check_not_null(df, col, origin, "a number (numeric feature)")
        if s.dtype.is_float():
            _fail(origin, col, s.is_infinite(), s, "a finite number")
        if feature.normalization == "log1p":
            clipped = s.clip(*feature.clip) if feature.clip is not None else s
            _fail(origin, col, clipped <= -1, s, "a value > -1 after clipping (log1p normalisation)")
        return
    if isinstance(feature, MultiCategoricalFeature):
        _check_multi(s, feature, origin)
        return
    expected = _id_dtype_ok(s.dtype, feature)
    if expected is not None:
        raise _dtype_error(origin, col, s.dtype, expected, s)
    check_not_null(df, col, origin, "a categorical value")
    bad = _out_of_range(s, feature)
    if bad is not None:
        _fail(origin, col, bad, s, f"an id in [0, {feature.num_embeddings}) (num_embeddings)")


def _check_multi(s: pl.Series, feature: MultiCategoricalFeature, origin: str) -> None:
    """A list column: no null lists, no null elements, element dtype and id range."""
    col = feature.name
    if not isinstance(s.dtype, pl.List):
        raise _dtype_error(origin, col, s.dtype, "a list of ids (multi_categorical feature)")
    expected = _id_dtype_ok(s.dtype.inner, feature)
    if expected is not None:
        raise _dtype_error(origin, col, s.dtype, f"a list of {expected}")
    if s.null_count():
        _fail(origin, col, s.is_null(), s, "a list of ids (nulls are not allowed; an empty list is)")
    has_null = s.list.eval(pl.element().is_null()).list.any()
    _fail(origin, col, has_null, s, "a list without null elements")
    elements = s.explode(empty_as_null=True).drop_nulls()  # real null elements were rejected above
    bad = _out_of_range(elements, feature)
    if bad is None:
        return
    lengths = s.list.len().to_numpy()
    row_of_element = np.repeat(np.arange(len(s)), lengths)
    first = int(bad.arg_max())
    row = int(row_of_element[first])
    raise DataError(
        f"{origin}: column '{col}', row {row}: got {s[row].to_list()!r} (element {elements[first]}); "
        f"expected ids in [0, {feature.num_embeddings}) (num_embeddings) "
        f"({int(bad.sum())} bad element(s) in this column)"
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def exposure_columns(schema: DataSchema, spec: ScenarioSpec) -> list[str]:
    """Every column the exposure table of ``spec`` must carry."""
    cols = [schema.user_column, schema.time.column]
    cols += [f.name for group in spec.feature_groups.values() for f in group]
    for task in spec.tasks:
        cols += task.labels + ([task.oracle_column] if task.oracle_column else [])
    return list(dict.fromkeys(cols))


def validate_exposure_table(df: pl.DataFrame, schema: DataSchema, spec: ScenarioSpec, origin: str,
                            *, labels_required: bool = True) -> None:
    """All checks of one scenario's exposure table (see the module docstring).

    ``labels_required=False`` is for inference candidates, which may come without labels and
    oracle columns (when present they are checked the same way).
    """
    features = [f for group in spec.feature_groups.values() for f in group]
    required = [schema.user_column, schema.time.column, *[f.name for f in features]]
    if labels_required:
        required += [c for t in spec.tasks for c in t.labels]
    require_columns(df, required, origin, f"exposure table of scenario '{spec.name}'")
    check_user_column(df, schema.user_column, origin)
    check_time_column(df, schema.time.column, origin, schema.time.unit)
    for feature in features:
        check_feature(df, feature, origin)
    for task in spec.tasks:
        for label in task.labels:
            if label in df.columns:
                check_label_column(df, label, origin, task.allow_missing)
        if task.oracle_column is not None and task.oracle_column in df.columns:
            check_oracle_column(df, task.oracle_column, origin)
        elif task.oracle_column is not None and labels_required:
            raise DataError(
                f"{origin}: missing column '{task.oracle_column}' (oracle of task '{task.name}' of scenario "
                f"'{spec.name}'); the table has {df.columns}"
            )


def validate_sequence_table(df: pl.DataFrame, schema: DataSchema, specs: list[SequenceSpec], origin: str) -> None:
    """Checks of a behaviour table, for every sequence type that reads it."""
    names = ", ".join(s.name for s in specs)
    features = {f.name: f for spec in specs for f in spec.features}
    require_columns(df, [schema.user_column, schema.time.column, *features], origin,
                    f"behaviour table of sequence type(s) {names}")
    check_user_column(df, schema.user_column, origin)
    check_time_column(df, schema.time.column, origin, schema.time.unit)
    for spec in specs:
        for feature in spec.features:
            check_feature(df, feature, origin)


def sequence_tables(schema: DataSchema) -> dict[str, list[SequenceSpec]]:
    """Behaviour table name -> the sequence types (H and R) that read it, in schema order."""
    out: dict[str, list[SequenceSpec]] = {}
    for spec in [*schema.history, *schema.realtime]:
        out.setdefault(spec.table, []).append(spec)
    return out


def check_tables_present(raw: RawTables, full: DataSchema, used: DataSchema) -> None:
    """Every table ``used`` needs is there; every table present is one ``full`` names."""
    known = {s.table for s in full.scenarios} | set(sequence_tables(full)) | set(full.side_tables())
    unknown = sorted(set(raw.tables) - known)
    if unknown:
        where = ", ".join(f"'{t}' (from {raw.origin(t)})" for t in unknown)
        raise DataError(
            f"table(s) {where} are not named by the schema: unknown scenario or behaviour table; "
            f"the schema's scenarios are {full.scenario_names} with tables "
            f"{[s.table for s in full.scenarios]}, behaviour tables {sorted(sequence_tables(full))}, "
            f"side tables {sorted(full.side_tables())}"
        )
    needed = [s.table for s in used.scenarios] + list(sequence_tables(used)) + list(used.side_tables())
    missing = [t for t in dict.fromkeys(needed) if t not in raw.tables]
    if missing:
        raise DataError(f"missing table(s) {missing}: the schema names them but the source did not provide them")


def validate_raw(raw: RawTables, used: DataSchema | None = None) -> None:
    """Validate every table ``used`` (default: the full schema of ``raw``) reads."""
    used = used or raw.schema
    check_tables_present(raw, raw.schema, used)
    for spec in used.scenarios:
        validate_exposure_table(raw.tables[spec.table], used, spec, raw.origin(spec.table))
    for table, specs in sequence_tables(used).items():
        validate_sequence_table(raw.tables[table], used, specs, raw.origin(table))
