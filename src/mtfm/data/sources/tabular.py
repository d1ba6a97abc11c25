"""File handling shared by the real-data sources (MovieLens, KuaiRand).

Why this module exists: both sources read delimited text files written by someone else, and
every problem in them (missing file, missing column, a value of the wrong type, a null where
one is not allowed) must be reported before any work starts, naming the file, the column and
the line, so that a user can fix the file without reading code. Both sources also compute
"past-only" statistics (how often did this user click before this exposure?) that must use
strictly earlier events, and both resolve a default data directory and a packaged schema.

Nothing here knows about a particular data set.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import polars as pl

from mtfm.config import DataSchema, ScenarioSpec, SequenceSpec, load_schema

ColumnKind = Literal["int", "float", "str"]


class SourceFileError(ValueError):
    """A raw file that cannot be read as documented; the message names file, column and line."""


# --------------------------------------------------------------------------------------------
# Locating data
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout this module lives in (``src/mtfm/data/sources/`` -> four levels up)."""
    return Path(__file__).resolve().parents[4]


def candidate_dirs(explicit: str | None, env_var: str, default_relative: str) -> list[Path]:
    """Where to look for a data set, in order: the explicit path, the env var, the defaults.

    The default is given relative to the repository (``../shared/data/...``); it is tried
    against the checkout this module lives in and against the current directory, so both an
    editable install and a run from the repository root find it.
    """
    if explicit is not None:
        return [Path(explicit).expanduser()]
    found: list[Path] = []
    if os.environ.get(env_var):
        found.append(Path(os.environ[env_var]).expanduser())
    found += [repo_root() / default_relative, Path.cwd() / default_relative]
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def find_data_dir(
    explicit: str | None,
    *,
    env_var: str,
    default_relative: str,
    marker_glob: str,
    subdirs: Sequence[str] = ("", "raw", "data"),
    what: str,
) -> Path:
    """The first candidate directory (or its ``raw/`` / ``data/`` sub-folder) holding ``marker_glob``.

    Raises FileNotFoundError listing every place that was tried.
    """
    tried: list[str] = []
    for base in candidate_dirs(explicit, env_var, default_relative):
        for sub in subdirs:
            d = base / sub if sub else base
            tried.append(str(d))
            if d.is_dir() and any(d.glob(marker_glob)):
                return d.resolve()
    hint = f" (set --path or the environment variable {env_var})"
    raise FileNotFoundError(f"{what}: no {marker_glob} found; looked in {tried}{hint}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    return path


# --------------------------------------------------------------------------------------------
# Reading delimited files with checked columns and types
# --------------------------------------------------------------------------------------------


def read_table(
    path: Path,
    columns: Mapping[str, ColumnKind],
    *,
    separator: str = ",",
    header: Sequence[str] | None = None,
    nullable: Iterable[str] = (),
    encoding: str = "utf8",
    quote_char: str | None = '"',
) -> pl.DataFrame:
    """Read ``path`` and return exactly ``columns`` with checked types (Int64 / Float64 / String).

    ``header=None``: the file has a header line and must contain every column named in
    ``columns`` (others are ignored). ``header=[...]``: the file has no header line and must
    have exactly ``len(header)`` fields per line, named by ``header``.

    The file is parsed with the declared types; if any value does not parse, it is read again
    as text to report the first bad value with its file, column and line (instead of a parser
    error). Integers written as integral floats (``"87433.0"``, as in KuaiRand's tables) are
    accepted. Empty fields are nulls; a null in a column not listed in ``nullable`` is an
    error. Values are taken as written (no whitespace stripping).
    """
    require_file(path, "input")
    options = {"separator": separator, "header": header, "encoding": encoding, "quote_char": quote_char}
    typed = _read_typed(path, columns, **options)
    if typed is None:
        text = _read_text(path, **options)
        missing = [c for c in columns if c not in text.columns]
        if missing:
            raise SourceFileError(f"{path}: missing column(s) {missing}; the file has {text.columns}")
        typed = pl.DataFrame([_typed_column(text[name], kind, path, _first_line(header)) for name, kind in columns.items()])
    allowed_null = set(nullable)
    for name, kind in columns.items():
        if name not in allowed_null and typed[name].null_count():
            row = int(typed[name].is_null().arg_max())  # first null
            raise SourceFileError(
                f"{path}: column '{name}' line {row + _first_line(header)}: empty value; expected {_KIND_WORD[kind]}"
            )
    return typed


def _first_line(header: Sequence[str] | None) -> int:
    """File line of the first data row: 1 without a header line, else 2."""
    return 1 if header is not None else 2


_DTYPES: dict[str, type[pl.DataType]] = {"int": pl.Int64, "float": pl.Float64, "str": pl.String}


def _read_typed(
    path: Path,
    columns: Mapping[str, ColumnKind],
    *,
    separator: str,
    header: Sequence[str] | None,
    encoding: str,
    quote_char: str | None,
) -> pl.DataFrame | None:
    """The fast typed parse; None when anything does not fit (the text read then explains)."""
    overrides = {name: _DTYPES[kind] for name, kind in columns.items()}
    common = {"separator": separator, "encoding": encoding, "quote_char": quote_char}
    try:
        if header is None:
            found = pl.read_csv(path, n_rows=0, infer_schema=False, **common).columns
            if any(c not in found for c in columns):
                return None
            df = pl.read_csv(path, columns=list(columns), schema_overrides=overrides, **common)
        else:
            df = pl.read_csv(path, has_header=False, new_columns=list(header), schema_overrides=overrides, **common)
            if df.width != len(header):
                return None
    except (pl.exceptions.PolarsError, UnicodeDecodeError, ValueError):
        return None
    if any(df[name].dtype != dtype for name, dtype in overrides.items()):
        return None
    return _drop_trailing_blank_rows(df.select(list(columns)))


def _drop_trailing_blank_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Trailing blank lines (u.genre ends with one) are not rows; blank lines inside stay rows
    (and fail the null checks) so that every reported line number is the file's."""
    filled = df.select(pl.any_horizontal(pl.all().is_not_null()).alias("_filled"))["_filled"]
    return df.head(int(filled.arg_true().max()) + 1 if filled.any() else 0)


_KIND_WORD = {"int": "an integer", "float": "a number", "str": "a text value"}


def _read_text(
    path: Path, *, separator: str, header: Sequence[str] | None, encoding: str, quote_char: str | None
) -> pl.DataFrame:
    try:
        df = pl.read_csv(
            path,
            separator=separator,
            has_header=header is None,
            infer_schema=False,
            encoding=encoding,
            quote_char=quote_char,
        )
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as err:
        raise SourceFileError(f"{path}: cannot be parsed as a '{separator}'-separated file: {err}") from None
    if header is not None:
        if df.width != len(header):
            raise SourceFileError(
                f"{path}: expected {len(header)} '{separator}'-separated fields per line "
                f"({list(header)}), found {df.width}"
            )
        df.columns = list(header)
    return _drop_trailing_blank_rows(df)


def _typed_column(text: pl.Series, kind: ColumnKind, path: Path, first_line: int) -> pl.Series:
    if kind == "str":
        return text
    as_float = text.cast(pl.Float64, strict=False)
    bad = as_float.is_null() & text.is_not_null()
    if kind == "int":
        bad = bad | (as_float.is_not_null() & (as_float.round(0) != as_float))
    if bad.any():
        row = int(bad.arg_max())
        raise SourceFileError(
            f"{path}: column '{text.name}' line {row + first_line}: expected {_KIND_WORD[kind]}, "
            f"got {text[row]!r}"
        )
    if kind == "float":
        return as_float
    # Integral floats ("87433.0") fail the direct integer cast; take those from the float read
    # (the direct cast stays exact for integers beyond 2**53, such as KuaiRand's music ids).
    as_int = text.cast(pl.Int64, strict=False)
    return pl.select(pl.coalesce(as_int, as_float.cast(pl.Int64))).to_series().alias(text.name)


def check_binary(df: pl.DataFrame, columns: Iterable[str], path: Path | str, first_line: int) -> None:
    """Every value of ``columns`` is 0 or 1 (labels); else an error naming file, column, line."""
    for name in columns:
        bad = ~df[name].is_in([0, 1])
        if bad.any():
            row = int(bad.arg_max())
            raise SourceFileError(
                f"{path}: column '{name}' line {row + first_line}: expected 0 or 1, got {df[name][row]}"
            )


def check_known_ids(
    df: pl.DataFrame, column: str, known: pl.Series, path: Path | str, first_line: int, side_table: Path | str
) -> None:
    """Every ``df[column]`` value appears in ``known`` (a join key); else an error naming the row."""
    bad = ~df[column].is_in(known.implode())
    if bad.any():
        row = int(bad.arg_max())
        raise SourceFileError(
            f"{path}: column '{column}' line {row + first_line}: id {df[column][row]} is not in "
            f"{side_table} ({int(bad.sum())} row(s) in total have unknown ids)"
        )


# --------------------------------------------------------------------------------------------
# Past-only statistics
# --------------------------------------------------------------------------------------------


def strictly_earlier_totals(
    df: pl.DataFrame, keys: Sequence[str], time: str, sums: Mapping[str, pl.Expr], prefix: str
) -> pl.DataFrame:
    """``df`` plus, per row, the count and sums over rows with the same ``keys`` and an EARLIER time.

    Rows sharing a timestamp do not see each other (a user who rates two movies in the same
    second has seen neither outcome when rating either), so the features never use the row's
    own label or a simultaneous one. Adds ``{prefix}count`` and ``{prefix}{name}`` for every
    entry of ``sums`` (an expression evaluated per row, summed).

    One sort and running sums: with rows ordered by (keys, time), the total before a row is
    the running sum just before its tie group (same keys and time) starts, minus the running
    sum just before its key group starts.
    """
    values = {"count": pl.lit(1, dtype=pl.Int64), **sums}
    work = df.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"),
        *[pl.col(k).alias(f"_k{i}") for i, k in enumerate(keys)],
        pl.col(time).alias("_t"),
        *[expr.alias(f"_v_{name}") for name, expr in values.items()],
    ).sort([*[f"_k{i}" for i in range(len(keys))], "_t"])
    new_group = pl.any_horizontal([pl.col(f"_k{i}").ne_missing(pl.col(f"_k{i}").shift(1)) for i in range(len(keys))])
    new_tie = new_group | pl.col("_t").ne_missing(pl.col("_t").shift(1))
    totals = []
    for name in values:
        before = pl.col(f"_v_{name}").cum_sum() - pl.col(f"_v_{name}")  # running sum before this row
        at_tie = pl.when(new_tie).then(before).forward_fill()
        at_group = pl.when(new_group).then(before).forward_fill()
        totals.append((at_tie - at_group).alias(f"{prefix}{name}"))
    result = work.select("_row", *totals).sort("_row").drop("_row")
    return df.hstack(result)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def packaged_schema(name: str) -> DataSchema:
    """The schema YAML shipped in ``mtfm/configs/<name>.yaml``."""
    resource = importlib.resources.files("mtfm") / "configs" / f"{name}.yaml"
    with importlib.resources.as_file(resource) as path:
        return load_schema(path)


def scenario_columns(schema: DataSchema, spec: ScenarioSpec) -> list[str]:
    """Every column an exposure table must carry for ``spec``, in a stable order."""
    cols = [schema.user_column, schema.time.column]
    cols += [f.name for group in spec.feature_groups.values() for f in group]
    for task in spec.tasks:
        cols += task.labels + ([task.oracle_column] if task.oracle_column else [])
    return list(dict.fromkeys(cols))


def sequence_columns(schema: DataSchema, spec: SequenceSpec) -> list[str]:
    return list(dict.fromkeys([schema.user_column, schema.time.column, *[f.name for f in spec.features]]))


def select_columns(df: pl.DataFrame, wanted: Sequence[str], *, table: str, source: str, origin: str) -> pl.DataFrame:
    """``df`` restricted to ``wanted``; a column the source cannot produce is a clear error."""
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise SourceFileError(
            f"{source}: the schema asks table '{table}' (from {origin}) for column(s) {missing}, "
            f"which this source does not produce; available: {sorted(df.columns)}"
        )
    return df.select(wanted)


def sequence_tables(
    schema: DataSchema, behaviour: pl.DataFrame, *, source: str, origin: str
) -> tuple[dict[str, pl.DataFrame], dict[str, str]]:
    """One behaviour table per distinct sequence table, with the union of its types' columns.

    Several sequence types (e.g. history and real-time) may read the same table, each with its
    own features; the table then carries every column any of them needs.
    """
    wanted: dict[str, list[str]] = {}
    for seq in [*schema.history, *schema.realtime]:
        wanted.setdefault(seq.table, [])
        wanted[seq.table] = list(dict.fromkeys([*wanted[seq.table], *sequence_columns(schema, seq)]))
    tables = {t: select_columns(behaviour, cols, table=t, source=source, origin=origin) for t, cols in wanted.items()}
    return tables, {t: origin for t in tables}
