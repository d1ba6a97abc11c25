"""The behaviour store of the HTTP service: users' raw behaviour rows in one SQLite file.

Serving scores a request with :func:`mtfm.data.aggregate.build_request`, the training feature
code, which needs the user's *raw* behaviour rows (the prepared shards hold encoded ones). The
store keeps them, one SQLite table per behaviour table of the schema, with the exact polars
dtypes of the source (``columns`` below): a row read back is the row the source gave, so a
request built from the store equals one built from the source tables (hashing and
normalisation see the same values) -- ``tests/test_behaviour_store.py``.

Why SQLite: an embedded, well-kept database in the standard library; WAL mode lets the
server's threads read while an append writes; every query is parameterised; an append is one
transaction (validated first), so a bad or interrupted request leaves the file as it was.

Layout::

    meta(key TEXT PRIMARY KEY, value TEXT)          format, data fingerprint, columns (JSON)
    users(user INTEGER PRIMARY KEY, version INTEGER) bumped by every append (cache versions)
    "b:<table>"(seq INTEGER PRIMARY KEY, <user>, <ts>, <features>...)  seq = source order

Rows are read back in ``seq`` order, which is the source table's order (equal timestamps keep
it, as aggregation does). List columns (multi-categorical features) are stored as JSON text.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mtfm.config import DataSchema
from mtfm.data.timestamps import frame_to_unit
from mtfm.data.validate import DataError, sequence_tables, validate_sequence_table

STORE_FORMAT = 1
MAX_INT64 = (1 << 63) - 1


def _quote(name: str) -> str:
    """A SQL identifier (column and table names come from the schema, never from a request)."""
    return '"' + name.replace('"', '""') + '"'


def dtype_from_text(text: str) -> pl.DataType:
    """The polars dtype ``str(dtype)`` wrote: ``Int32``, ``Float64``, ``String``, ``List(Int32)``."""
    if text.startswith("List(") and text.endswith(")"):
        return pl.List(dtype_from_text(text[5:-1]))
    dtype = getattr(pl, text, None)
    if dtype is None or not isinstance(dtype, type) or not issubclass(dtype, pl.DataType):
        raise ValueError(f"behaviour store: unsupported column dtype {text!r}")
    return dtype()


def _sql_value(value: Any) -> Any:
    """A polars value as SQLite stores it (lists as JSON text)."""
    return json.dumps(value) if isinstance(value, list) else value


class BehaviourStore:
    """Users' behaviour rows by user id, one SQLite connection per thread (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no behaviour store (build it with `mtfm serve --build-store`)")
        self._local = threading.local()
        self._write_lock = threading.Lock()
        meta = dict(self._conn().execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("format", 0)) != STORE_FORMAT:
            raise ValueError(f"{self.path}: behaviour store format {meta.get('format')}, this version reads {STORE_FORMAT}")
        self.fingerprint: str = meta["fingerprint"]
        self.user_column: str = meta["user_column"]
        self.time_column: str = meta["time_column"]
        self.columns = _columns_from_json(meta["columns"])
        self.request_columns = _columns_from_json(meta["request_columns"])

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=True)
            conn.execute("PRAGMA busy_timeout = 30000")
            self._local.conn = conn
        return conn

    @property
    def tables(self) -> list[str]:
        return list(self.columns)

    def user_version(self, user: int) -> int:
        """How many appends the user has had: part of the prefix cache's version."""
        row = self._conn().execute("SELECT version FROM users WHERE user = ?", (user,)).fetchone()
        return int(row[0]) if row else 0

    def user_rows(self, user: int, before: int | None = None) -> dict[str, pl.DataFrame]:
        """Every behaviour table's rows of ``user`` (``ts < before`` when given), in source order,
        with the source's dtypes."""
        out = {}
        for table, cols in self.columns.items():
            names = ", ".join(_quote(c) for c in cols)
            sql = f"SELECT {names} FROM {_quote('b:' + table)} WHERE {_quote(self.user_column)} = ?"
            params: list[int] = [user]
            if before is not None:
                sql += f" AND {_quote(self.time_column)} < ?"
                params.append(before)
            rows = self._conn().execute(sql + " ORDER BY seq", params).fetchall()
            out[table] = _frame(rows, cols)
        return out

    def append(self, table: str, rows: pl.DataFrame) -> int:
        """Append validated ``rows`` of one behaviour table (every row one user's, already cast to
        the store's dtypes) in one transaction; bump each user's version. Returns the row count."""
        cols = self.columns[table]
        names = ", ".join(_quote(c) for c in cols)
        marks = ", ".join("?" for _ in cols)
        values = [tuple(_sql_value(v) for v in row) for row in rows.select(list(cols)).iter_rows()]
        users = sorted({int(u) for u in rows[self.user_column]})
        with self._write_lock:
            conn = self._conn()
            with conn:  # one transaction: all rows and versions, or nothing
                conn.executemany(f"INSERT INTO {_quote('b:' + table)} ({names}) VALUES ({marks})", values)
                conn.executemany("INSERT INTO users(user, version) VALUES (?, 1) "
                                 "ON CONFLICT(user) DO UPDATE SET version = version + 1", [(u,) for u in users])
        return len(values)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _columns_from_json(text: str) -> dict[str, dict[str, pl.DataType]]:
    return {key: {c: dtype_from_text(t) for c, t in cols.items()} for key, cols in json.loads(text).items()}


def _columns_to_json(columns: Mapping[str, Mapping[str, pl.DataType]]) -> str:
    return json.dumps({key: {c: str(d) for c, d in cols.items()} for key, cols in columns.items()})


def request_columns(tables: Mapping[str, pl.DataFrame], schema: DataSchema) -> dict[str, dict[str, pl.DataType]]:
    """Per scenario, the feature columns a request's candidates carry (user, cross, item) and
    their dtypes in the scenario's exposure table: requests are cast to exactly these."""
    out = {}
    for spec in schema.scenarios:
        frame = tables.get(spec.table)
        if frame is None:
            raise DataError(f"behaviour store: missing exposure table '{spec.table}' of scenario {spec.name}")
        names = [f.name for feats in spec.feature_groups.values() for f in feats]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise DataError(f"behaviour store: exposure table '{spec.table}' has no column(s) {missing}")
        out[spec.name] = {n: frame.schema[n] for n in dict.fromkeys(names)}
    return out


def _frame(rows: list[tuple], cols: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """SQLite rows back to a polars frame with the stored dtypes (JSON text back to lists)."""
    data: dict[str, list[Any]] = {c: [] for c in cols}
    names = list(cols)
    for row in rows:
        for name, value in zip(names, row):
            data[name].append(json.loads(value) if isinstance(cols[name], pl.List) and value is not None else value)
    return pl.DataFrame({c: pl.Series(c, data[c], dtype=cols[c]) for c in names})


def store_columns(tables: Mapping[str, pl.DataFrame], schema: DataSchema) -> dict[str, dict[str, pl.DataType]]:
    """Per behaviour table, the columns the store keeps (user, time, the sequence features) and
    their dtypes in ``tables``."""
    out = {}
    for table, specs in sequence_tables(schema).items():
        if table not in tables:
            raise DataError(f"behaviour store: missing behaviour table '{table}' (the schema's sequences read it)")
        names = [schema.user_column, schema.time.column, *dict.fromkeys(f.name for s in specs for f in s.features)]
        frame = tables[table]
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise DataError(f"behaviour store: table '{table}' has no column(s) {missing}")
        out[table] = {n: frame.schema[n] for n in names}
    return out


def build_store(tables: Mapping[str, pl.DataFrame], schema: DataSchema, path: str | Path, fingerprint: str,
                origins: Mapping[str, str] | None = None) -> BehaviourStore:
    """Write the behaviour tables of ``schema`` into a new SQLite file at ``path`` (written beside
    it, then renamed: a crash leaves no half-built store), with the dtypes of every table's
    columns (behaviour and, for requests, the scenarios' features). Timestamps are converted to
    the schema's unit first, as ``prepare`` does."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists (pass --rebuild-store to replace it)")
    origins = origins or {}
    converted = {t: frame_to_unit(tables[t], schema.time.column, schema.time.unit, origins.get(t, t))
                 for t in sequence_tables(schema) if t in tables}
    for table, specs in sequence_tables(schema).items():
        if table in converted:
            validate_sequence_table(converted[table], schema, specs, origins.get(table, table))
    columns = store_columns(converted, schema)
    requests = request_columns(tables, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.building")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        _write_tables(conn, converted, columns, schema)
        meta = {"format": str(STORE_FORMAT), "fingerprint": fingerprint, "user_column": schema.user_column,
                "time_column": schema.time.column,
                "columns": _columns_to_json(columns), "request_columns": _columns_to_json(requests)}
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
        conn.commit()
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    tmp.replace(path)
    return BehaviourStore(path)


def _write_tables(conn: sqlite3.Connection, tables: Mapping[str, pl.DataFrame],
                  columns: Mapping[str, Mapping[str, pl.DataType]], schema: DataSchema) -> None:
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("CREATE TABLE users(user INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
    ucol, tcol = _quote(schema.user_column), _quote(schema.time.column)
    for table, cols in columns.items():
        name = _quote("b:" + table)
        defs = ", ".join(f"{_quote(c)}" for c in cols)
        conn.execute(f"CREATE TABLE {name}(seq INTEGER PRIMARY KEY, {defs})")
        marks = ", ".join("?" for _ in cols)
        rows = tables[table].select(list(cols)).iter_rows()
        conn.executemany(f"INSERT INTO {name} ({', '.join(_quote(c) for c in cols)}) VALUES ({marks})",
                         (tuple(_sql_value(v) for v in row) for row in rows))
        conn.execute(f"CREATE INDEX {_quote('i:' + table)} ON {name}({ucol}, {tcol}, seq)")


def actions_frame(rows: Sequence[Mapping[str, Any]], cols: Mapping[str, pl.DataType], where: str) -> pl.DataFrame:
    """Request rows (JSON objects) as a frame with the store's dtypes; errors name the row and
    column (``where`` is the request field, e.g. ``actions``)."""
    for i, row in enumerate(rows):
        unknown = [k for k in row if k not in cols]
        if unknown:
            raise DataError(f"{where}[{i}]: unknown column(s) {unknown}; the table has {list(cols)}")
        missing = [c for c in cols if c not in row]
        if missing:
            raise DataError(f"{where}[{i}]: missing column(s) {missing}")
    return pl.DataFrame({c: typed_column(c, [r[c] for r in rows], d, where) for c, d in cols.items()})


def typed_column(name: str, values: list[Any], dtype: pl.DataType, where: str) -> pl.Series:
    """``values`` as a Series of exactly ``dtype``; a value that does not fit names the field."""
    for i, v in enumerate(values):
        problem = _value_problem(v, dtype)
        if problem:
            raise DataError(f"{where}[{i}].{name}: {problem}")
    try:
        return pl.Series(name, values, dtype=dtype, strict=True)
    except Exception as err:  # noqa: BLE001 -- any conversion failure is the request's, named here
        raise DataError(f"{where}.{name}: values do not fit the column's type {dtype} ({type(err).__name__})") from None


def _value_problem(value: Any, dtype: pl.DataType) -> str | None:
    """Why ``value`` cannot be stored as ``dtype`` (None when it can)."""
    if value is None:
        return "null is not allowed"
    if isinstance(dtype, pl.List):
        if not isinstance(value, list):
            return f"expected a list, got {type(value).__name__}"
        for v in value:
            inner = _value_problem(v, dtype.inner)
            if inner:
                return f"list item: {inner}"
        return None
    if dtype.is_integer():
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {type(value).__name__}"
        info = _int_bounds(dtype)
        return None if info[0] <= value <= info[1] else f"{value} is outside the column's range {list(info)}"
    if dtype.is_float():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {type(value).__name__}"
        if not math.isfinite(float(value)) or abs(float(value)) > 3.0e38:
            return f"{value} is not a finite number in float range"
        return None
    if dtype == pl.String:
        return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"
    return f"unsupported column type {dtype}"


def _int_bounds(dtype: pl.DataType) -> tuple[int, int]:
    bits = {pl.Int8: 8, pl.Int16: 16, pl.Int32: 32, pl.Int64: 64, pl.UInt8: 8, pl.UInt16: 16,
            pl.UInt32: 32, pl.UInt64: 64}[type(dtype)]
    if dtype.is_signed_integer():
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def reload_source(data_dir: str | Path):
    """The raw tables ``data_dir`` was prepared from, read again from what its manifest records
    (the synthetic world's config, or the directory / MovieLens / KuaiRand path): the store
    needs raw rows, which the prepared shards no longer hold."""
    from mtfm.data.store import read_manifest

    manifest = read_manifest(data_dir)
    source = manifest.source or {}
    kind = source.get("source")
    schema = manifest.schema_obj
    if kind == "synthetic" and "config" in source:
        from mtfm.data.sources.synthetic import SyntheticConfig, generate

        return generate(SyntheticConfig(**source["config"]))
    paths = {"directory": "directory", "movielens-100k": "movielens", "kuairand": "kuairand"}
    if kind not in paths or "path" not in source:
        raise ValueError(f"{data_dir}: prepared from source {kind!r}, which records no way to read its raw "
                         f"behaviour tables again (known: synthetic, {', '.join(paths)})")
    import importlib

    module = importlib.import_module(f"mtfm.data.sources.{paths[kind]}")
    users = source.get("users") if kind == "directory" else source.get("users_requested")
    return module.load_source(source["path"], schema, users, int(source.get("seed", 0)))


def open_or_build_store(data_dir: str | Path, path: str | Path, rebuild: bool = False) -> BehaviourStore:
    """The store at ``path``, built from ``data_dir``'s source when missing (or ``rebuild``).
    A store built from other data (another manifest fingerprint) is refused."""
    from mtfm.data.store import data_fingerprint, read_manifest

    path = Path(path)
    fingerprint = data_fingerprint(data_dir)
    if rebuild and path.exists():
        path.unlink()
        for extra in ("-wal", "-shm"):
            Path(f"{path}{extra}").unlink(missing_ok=True)
    if not path.exists():
        raw = reload_source(data_dir)
        return build_store(raw.tables, read_manifest(data_dir).schema_obj, path, fingerprint, raw.origins)
    store = BehaviourStore(path)
    if store.fingerprint != fingerprint:
        raise ValueError(f"{path}: a behaviour store of other data (fingerprint {store.fingerprint}, {data_dir} has "
                         f"{fingerprint}); pass --rebuild-store to build it again from {data_dir}")
    return store
