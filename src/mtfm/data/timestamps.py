"""Timestamps as users have them -> integers in the schema's unit, before any check or work.

Why one conversion up front: everything downstream (validation, windows, splits, the store)
works on integer timestamps in ``schema.time.unit``. Converting once, where the tables enter
``prepare`` and ``build_request``, keeps the prepared store identical whatever form the input
had, and keeps per-row work in vectorised polars expressions.

Accepted forms of the time column (:func:`to_unit`):

* integers: already in the schema's unit (``s``, ``ms``, ``us`` or ``ns``), kept as they are;
* datetimes (Parquet ``timestamp`` with or without time zone, polars ``Datetime``, ``Date``):
  a time zone is honoured; a datetime *without* one is read as UTC;
* ISO-8601 text: ``2024-05-01T10:00:00+02:00``, ``...Z``, ``2024-05-01 10:00:00.25``,
  ``2024-05-01``; an offset is honoured, text without one is read as UTC. Forms may be mixed
  within a column. Text that is none of these is an error naming the row and the value.

Finer precision than the unit is floored to it (``10:00:00.9`` is second ``10:00:00`` for a
schema in ``s``). Nulls stay null, so the validation names their rows as it does for integers.

:func:`check_unit` then catches the most common slip with integer input: values that look
like another unit (milliseconds in a schema in seconds) are an error that names both units.
"""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import polars as pl

from mtfm.config import PER_SECOND, DataSchema
from mtfm.data.raw import RawTables
from mtfm.data.validate import DataError, sequence_tables

UNIT_WORDS: dict[str, str] = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}

# ISO-8601 forms tried in order on text (after "Z" -> "+00:00" and a space separator -> "T").
_ISO_FORMATS: tuple[tuple[str, bool], ...] = (
    ("%Y-%m-%dT%H:%M:%S%.f%:z", True),  # with an offset
    ("%Y-%m-%dT%H:%M:%S%.f%#z", True),  # offset written +0200
    ("%Y-%m-%dT%H:%M:%S%.f", False),  # no offset: UTC
    ("%Y-%m-%dT%H:%M", False),
    ("%Y-%m-%d", False),
)

# Epoch values of 1990-01-01 and 2100-01-01 in seconds: the range real logs fall into.
_PLAUSIBLE_S = (631_152_000, 4_102_444_800)


def _parse_iso(text: pl.Series) -> pl.Series:
    """Text -> Datetime(ns, UTC); values in no accepted form become null."""
    canonical = text.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T").str.replace(r"Z$", "+00:00")
    frame = canonical.to_frame("t")
    tries = [pl.col("t").str.to_datetime(fmt, time_unit="ns", time_zone="UTC", strict=False)
             for fmt, _ in _ISO_FORMATS]
    return frame.select(pl.coalesce(tries)).to_series().alias(text.name)


def to_unit(s: pl.Series, unit: str, origin: str) -> pl.Series:
    """The time column ``s`` as Int64 epoch values in ``unit`` (see the module docstring).

    Integer and other (wrong) dtypes are returned unchanged: integers are already in the unit,
    and a wrong dtype is reported by :mod:`mtfm.data.validate` with what was expected.
    """
    if s.dtype == pl.Date:
        s = s.cast(pl.Datetime("ms"))
    if s.dtype == pl.String:
        parsed = _parse_iso(s)
        bad = parsed.is_null() & s.is_not_null()
        if bad.any():
            row = int(bad.arg_max())
            raise DataError(
                f"{origin}: column '{s.name}', row {row}: got {s[row]!r}; expected a timestamp: an integer in "
                f"'{unit}', a datetime, or ISO-8601 text such as '2024-05-01T10:00:00+02:00' "
                f"({int(bad.sum())} bad row(s) in this column)"
            )
        s = parsed
    if isinstance(s.dtype, pl.Datetime):
        return s.dt.epoch(unit).alias(s.name)  # type: ignore[arg-type]
    return s


def _time_tables(schema: DataSchema) -> list[str]:
    """Every table ``schema`` reads (exposure and behaviour tables), each once."""
    return list(dict.fromkeys([s.table for s in schema.scenarios] + list(sequence_tables(schema))))


def frame_to_unit(df: pl.DataFrame, column: str, unit: str, origin: str) -> pl.DataFrame:
    """``df`` with its time ``column`` in ``unit``: other forms converted, integers checked
    against the unit (:func:`check_unit`); a missing column is left to the validation."""
    if column not in df.columns:
        return df
    if df[column].dtype.is_integer():
        check_unit(df, column, unit, origin)
        return df
    return df.with_columns(to_unit(df[column], unit, origin))


def tables_to_unit(raw: RawTables, schema: DataSchema) -> RawTables:
    """``raw`` with the time column of every table ``schema`` reads in the schema's unit."""
    tables = dict(raw.tables)
    for name in _time_tables(schema):
        if name in tables:
            tables[name] = frame_to_unit(tables[name], schema.time.column, schema.time.unit, raw.origin(name))
    return RawTables(raw.schema, tables, raw.origins, dict(raw.pre_dropped), dict(raw.info))


def _looks_like(median: float) -> str | None:
    """The unit in which an epoch value ``median`` falls in 1990..2100, if any."""
    for unit, per_second in PER_SECOND.items():
        if _PLAUSIBLE_S[0] * per_second <= median < _PLAUSIBLE_S[1] * per_second:
            return unit
    return None


def _as_date(value: float, unit: str) -> str:
    return dt.datetime.fromtimestamp(value / PER_SECOND[unit], tz=dt.timezone.utc).strftime("%Y-%m-%d")


def check_unit(df: pl.DataFrame, column: str, unit: str, origin: str) -> None:
    """An error when the integer timestamps of ``df`` look like another unit than ``unit``.

    Why: a log in milliseconds read as seconds gives windows 1000x too short and a split in
    the far future, which shows up much later as an empty split or a useless model. Only
    values that are calendar dates (1990..2100) in another unit and not in ``unit`` are
    flagged, so small synthetic clocks (t = 0, 1, 2, ...) pass.
    """
    s = df[column]
    if len(s) == 0 or not s.dtype.is_integer() or s.null_count() > 0:
        return
    sample = s.gather_every(max(1, len(s) // 100_000))  # a median of 100k values is plenty, and cheap
    median = float(sample.median())  # type: ignore[arg-type]
    seen = _looks_like(median)
    if seen is None or seen == unit:
        return
    raise DataError(
        f"{origin}: column '{column}': the timestamps look like {UNIT_WORDS[seen]} (median {int(median)} is "
        f"{_as_date(median, seen)} in '{seen}'), but the schema says time.unit '{unit}' "
        f"({UNIT_WORDS[unit]}); set time.unit: {seen} (and window, split boundaries, time.min/max in {seen})"
    )


def describe(value: int, unit: str) -> str:
    """``value`` with its UTC calendar time when it is a plausible epoch value in ``unit``
    (messages then show ``1700000000 (2023-11-14 22:13:20 UTC)``), else the number alone."""
    if _looks_like(float(value)) != unit:
        return str(value)
    when = dt.datetime.fromtimestamp(value / PER_SECOND[unit], tz=dt.timezone.utc)
    return f"{value} ({when.strftime('%Y-%m-%d %H:%M:%S')} UTC)"


def check_splits_not_empty(windows: np.ndarray, window: int, unit: str, valid_start: int, test_start: int,
                           absolute: bool) -> None:
    """An error naming the boundaries and the data's range when a split the schema asks for
    has no window.

    Why here and not later: an empty train split otherwise surfaces as a normalisation error
    (no rows to fit on) and an empty valid/test split as a training or shard error, neither of
    which says that the split boundaries miss the data. Train must never be empty; with
    absolute boundaries valid (when ``valid_start < test_start``) and test must not be either.
    Fraction splits keep train non-empty by construction and give valid/test what rounding
    gives them, so only train is checked for them.
    """
    starts = np.unique(windows) * window
    if starts.size == 0:
        return
    counts = {
        "train": int((starts < valid_start).sum()),
        "valid": int(((starts >= valid_start) & (starts < test_start)).sum()),
        "test": int((starts >= test_start).sum()),
    }
    wanted = ["train"] + (["valid"] * (valid_start < test_start) + ["test"] if absolute else [])
    empty = [name for name in wanted if counts[name] == 0]
    if not empty:
        return
    first, last_end = int(starts[0]), int(starts[-1]) + window
    raise DataError(
        f"split {empty[0]!r} is empty: boundaries valid_start={describe(valid_start, unit)}, "
        f"test_start={describe(test_start, unit)} vs data range [{describe(first, unit)}, "
        f"{describe(last_end, unit)}) ({starts.size} window(s) of {window} {unit} with exposures: "
        f"train {counts['train']}, valid {counts['valid']}, test {counts['test']}); move split.valid_start / "
        f"split.test_start into the data range (they are in time.unit '{unit}')"
    )


def warn_far_timestamps(df: pl.DataFrame, column: str, unit: str, origin: str, window: int) -> int:
    """Warn (with counts) about timestamps far outside the bulk of ``df``'s; return how many.

    "Far": more than ten times the spread of the central 98% (at least one window) below its
    1st or above its 99th percentile -- a clock default (0 = 1970), a year typed wrong. Such
    rows are kept (they may be real); the warning says how to drop them, counted
    (``time.min`` / ``time.max``). Quantiles come from at most ~100k evenly spaced rows.
    """
    s = df[column]
    if len(s) < 100 or not s.dtype.is_integer():
        return 0
    sample = s.gather_every(max(1, len(s) // 100_000))
    lo, hi = float(sample.quantile(0.01)), float(sample.quantile(0.99))  # type: ignore[arg-type]
    reach = 10 * max(hi - lo, float(window))
    if s.min() >= lo - reach and s.max() <= hi + reach:  # type: ignore[operator]
        return 0  # the usual case: two reductions, no row masks
    below, above = s < lo - reach, s > hi + reach
    n_below, n_above = int(below.sum()), int(above.sum())
    if n_below + n_above == 0:
        return 0
    row = int((below | above).arg_max())
    warnings.warn(
        f"{origin}: column '{column}': {n_below + n_above} row(s) lie far outside the bulk of the timestamps "
        f"[{describe(int(lo), unit)}, {describe(int(hi), unit)}] ({n_below} before, {n_above} after; first: "
        f"row {row} = {describe(int(s[row]), unit)}); they are kept: set time.min / time.max to drop them "
        "(counted as timestamp_out_of_range)",
        stacklevel=2,
    )
    return n_below + n_above
