"""User-level multi-scenario aggregation (paper sections 3.1 and 3.3.1) -> Parquet shards.

One aggregated sample = one user and one time window (fixed length ``schema.window``, aligned
on the epoch: window id = ts // window) with at least one exposure in any scenario. It holds:

* every exposure of every scenario in the window, each scenario with its own columns (no
  padding, no alignment), sorted by timestamp (stable: rows with equal timestamps keep their
  order in the source table);
* per history type H: the most recent ``max_len`` actions with ts < window start;
* per real-time type R: the most recent ``max_len`` actions with ts < window end (they may
  overlap the window; the model masks them by timestamp);
* the timestamps of all of the above, encoded features and labels.

Bad-input policy (also printed by ``mtfm prepare --help``):

* errors, naming file, column, row and what was expected (see :mod:`mtfm.data.validate`):
  missing table / column, wrong dtype, null in a required field (user, timestamp, features,
  labels unless the task allows missing ones), negative timestamp, label outside {0, 1},
  categorical id outside [0, num_embeddings), unknown scenario (``--scenarios`` naming one not
  in the schema, or a table the schema does not name);
* counted drops, reported in ``manifest.json`` under ``dropped`` and printed:
  ``timestamp_out_of_range``: exposures with ts outside [time.min, time.max) (checked first);
  ``duplicate_exposure``: exact duplicate rows of an exposure table (every column equal), the
  first occurrence is kept; plus every count a source reports in ``RawTables.pre_dropped``;
* behaviour rows of a user with no exposure produce no sample; such users are counted in
  ``users_without_exposures`` (behaviour rows are not exposures, so not in ``dropped``).

The accounting ``input_exposures == output_exposures + sum(dropped)`` is checked before the
manifest is written.

How it stays fast (the target is >= 1M exposures/s on 2 cores): every table is sorted once by
one int64 key (split, user, time) -- users and times are mapped to dense ranges so the key
fits -- and everything else is arithmetic on sorted arrays: sample boundaries come from
``searchsorted`` on the keys, H/R slices from ``searchsorted`` of (user, window) in the sorted
behaviour table, list columns from offsets + one gathered values array. No Python loop runs
over users or samples; shards are written by two threads while the next one is assembled.

Inference requests (:func:`build_request`) run the same code with one user, one scenario and
the request's candidates as the exposures of the request's window, and encoding statistics
taken from the manifest.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mtfm.config import DataSchema, Feature, ScenarioSpec, SequenceSpec
from mtfm.data.batch import JaggedBatch
from mtfm.data.encode import FeatureStats, encode_feature, fit_stats
from mtfm.data.raw import RawTables
from mtfm.data.store import (
    SPLITS,
    Manifest,
    ScenarioInfo,
    ShardInfo,
    SplitBoundaries,
    SplitInfo,
    history_prefix,
    label_column,
    oracle_column,
    realtime_prefix,
    scenario_feature_columns,
    scenario_prefix,
    write_manifest,
)
from mtfm.data.validate import (
    DataError,
    require_columns,
    sequence_tables,
    validate_exposure_table,
    validate_raw,
    validate_sequence_table,
)
from mtfm.metrics import task_metrics

DEFAULT_MAX_SHARD_ROWS = 2_000_000  # exposures + sequence items per shard
_KEY_LIMIT = 1 << 62  # int64 keys stay below this (headroom for +1 / +2 offsets)


# --------------------------------------------------------------------------------------------
# Dense user index: lets (split, user, time) become one order-preserving int64 key
# --------------------------------------------------------------------------------------------


@dataclass
class _Users:
    """Order-preserving map from user id to a dense index in ``[0, n)``.

    ``offset`` mode (ids span a small range): index = id - min, free. ``rank`` mode (ids far
    apart, e.g. 64-bit hashes): index = position in the sorted unique ids.
    """

    lo: int
    n: int
    sorted_ids: np.ndarray | None  # rank mode only

    @classmethod
    def build(cls, ids: list[np.ndarray], span_per_user: int) -> "_Users":
        lo = min(int(a.min()) for a in ids if a.size)
        hi = max(int(a.max()) for a in ids if a.size)
        if (hi - lo + 1) * span_per_user < _KEY_LIMIT:
            return cls(lo, hi - lo + 1, None)
        uniq = np.unique(np.concatenate([np.unique(a) for a in ids]))
        if uniq.size * span_per_user >= _KEY_LIMIT:
            raise DataError(f"{uniq.size} users x {span_per_user} windows do not fit a 64-bit key")
        return cls(0, int(uniq.size), uniq)

    def index(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense index, known mask); unknown ids get index 0 and must be masked out."""
        if self.sorted_ids is None:
            idx = ids.astype(np.int64) - self.lo
            known = (idx >= 0) & (idx < self.n)
            return np.where(known, idx, 0), known
        pos = np.searchsorted(self.sorted_ids, ids)
        pos_c = np.minimum(pos, self.n - 1)
        known = self.sorted_ids[pos_c] == ids
        return np.where(known, pos_c, 0), known

    def ids(self, index: np.ndarray) -> np.ndarray:
        return index + self.lo if self.sorted_ids is None else self.sorted_ids[index]


def _stable_order(primary: list[np.ndarray], spans: list[int]) -> np.ndarray:
    """Stable argsort by several non-negative int64 columns (most significant first).

    Packs them into one int64 key when the spans allow it (one fast sort), else falls back to
    a multi-column stable sort. Already sorted input costs one linear check.
    """
    n = primary[0].size
    total = 1
    for s in spans:
        total *= max(s, 1)
    if total < _KEY_LIMIT:
        key = np.zeros(n, dtype=np.int64)
        for col, span in zip(primary, spans):
            key *= span
            key += col
        if n < 2 or bool(np.all(key[1:] >= key[:-1])):
            return np.arange(n, dtype=np.int64)
        frame = pl.DataFrame({"k": key})
    else:
        frame = pl.DataFrame({f"k{i}": c for i, c in enumerate(primary)})
    order = frame.select(pl.arg_sort_by(frame.columns, maintain_order=True)).to_series()
    return order.to_numpy().astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# Exposures
# --------------------------------------------------------------------------------------------


@dataclass
class _ScenarioRows:
    """Kept exposures of one scenario, in output order (split, user, time; stable)."""

    spec: ScenarioSpec
    origin: str
    frame: pl.DataFrame
    rows: np.ndarray  # original row index of each kept exposure
    user: np.ndarray
    ts: np.ndarray
    split: np.ndarray  # int8: 0 train, 1 valid, 2 test
    sample_key: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _drop_out_of_range(df: pl.DataFrame, schema: DataSchema) -> tuple[np.ndarray, int]:
    """Original row indices with ts in [time.min, time.max), and how many were dropped."""
    ts = df[schema.time.column]
    keep = pl.repeat(True, len(df), eager=True)
    if schema.time.min is not None:
        keep = keep & (ts >= schema.time.min)
    if schema.time.max is not None:
        keep = keep & (ts < schema.time.max)
    rows = keep.arg_true().to_numpy().astype(np.int64, copy=False)
    return rows, len(df) - rows.size


def _duplicate_mask(frame: pl.DataFrame, rows: np.ndarray, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """True for exact duplicate rows (not the first occurrence), given rows sorted stably by (user, ts).

    Exact duplicates share (user, ts) and are therefore adjacent; only rows with a neighbour of
    the same (user, ts) are compared on every column.
    """
    same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    if not same.any():
        return np.zeros(rows.size, dtype=bool)
    cand = np.zeros(rows.size, dtype=bool)
    cand[1:] |= same
    cand[:-1] |= same
    cand_pos = np.flatnonzero(cand)
    sub = frame[rows[cand_pos]]
    first = sub.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy()
    dup = np.zeros(rows.size, dtype=bool)
    dup[cand_pos[~first]] = True
    return dup


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def split_boundaries(schema: DataSchema, windows: np.ndarray) -> SplitBoundaries:
    """Window-start boundaries from the schema's SplitSpec and the windows that have samples.

    Fractions count distinct windows: the last ``round(test_fraction * n)`` windows are test,
    the ``round(valid_fraction * n)`` before them valid (round half up), and train always keeps
    at least one window. An empty split gets the boundary just after the last window.
    """
    spec = schema.split
    if spec.valid_start is not None and spec.test_start is not None:
        return SplitBoundaries(style="absolute", valid_start=spec.valid_start, test_start=spec.test_start)
    starts = np.unique(windows) * schema.window
    n = starts.size
    end = int(starts[-1]) + schema.window if n else 0
    n_test = min(int(np.floor((spec.test_fraction or 0.0) * n + 0.5)), max(n - 1, 0))
    n_valid = min(int(np.floor((spec.valid_fraction or 0.0) * n + 0.5)), max(n - 1 - n_test, 0))
    test_start = int(starts[n - n_test]) if n_test else end
    valid_start = int(starts[n - n_test - n_valid]) if n_valid else test_start
    return SplitBoundaries(style="fraction", valid_start=valid_start, test_start=test_start)


def _split_of(window: np.ndarray, schema: DataSchema, b: SplitBoundaries) -> np.ndarray:
    start = window * schema.window
    return ((start >= b.valid_start).astype(np.int8) + (start >= b.test_start).astype(np.int8)).astype(np.int8)


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------


@dataclass
class _SequenceTable:
    """A behaviour table restricted to users with samples, sorted by (user, ts) (stable)."""

    name: str
    origin: str
    frame: pl.DataFrame
    rows: np.ndarray  # original row index, in sorted order
    ts: np.ndarray
    key: np.ndarray  # user index * (windows + 2) + clipped window slot; non-decreasing


@dataclass
class _SequenceRows:
    """One sequence type: per sample [start, end) into its sorted behaviour table."""

    prefix: str
    spec: SequenceSpec
    table: _SequenceTable
    start: np.ndarray
    end: np.ndarray
    columns: dict[str, pa.Array | np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The aggregation (shared by prepare and build_request)
# --------------------------------------------------------------------------------------------


@dataclass
class Aggregation:
    """Every sample's bounds and every encoded column; ``table(a, b)`` assembles samples a..b-1."""

    schema: DataSchema
    boundaries: SplitBoundaries
    users: _Users
    window_lo: int
    sample_user: np.ndarray
    sample_window: np.ndarray
    sample_split: np.ndarray
    scenario_offsets: dict[str, np.ndarray]  # [samples + 1] rows of each scenario
    scenario_columns: dict[str, dict[str, pa.Array]]
    scenario_rows: dict[str, _ScenarioRows]
    sequences: list[_SequenceRows]
    stats: dict[str, FeatureStats]
    dropped: dict[str, int]
    input_exposures: int
    users_without_exposures: int

    @property
    def num_samples(self) -> int:
        return int(self.sample_user.size)

    def split_range(self, split: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self.sample_split, [split, split + 1])
        return int(lo), int(hi)

    def sample_weights(self, lo: int, hi: int) -> np.ndarray:
        """Exposures + sequence items of each sample in [lo, hi): the shard size measure."""
        w = np.zeros(hi - lo, dtype=np.int64)
        for off in self.scenario_offsets.values():
            w += np.diff(off[lo : hi + 1])
        for seq in self.sequences:
            w += seq.end[lo:hi] - seq.start[lo:hi]
        return w

    def table(self, a: int, b: int) -> pa.Table:
        """Samples [a, b) as an Arrow table with the store's columns (see mtfm.data.store)."""
        cols: dict[str, pa.Array] = {
            "user_id": pa.array(self.sample_user[a:b], type=pa.int64()),
            "window_start": pa.array(self.sample_window[a:b] * self.schema.window, type=pa.int64()),
        }
        for seq in self.sequences:
            lengths = seq.end[a:b] - seq.start[a:b]
            offsets = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            idx = np.repeat(seq.start[a:b] - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
            pa_offsets = pa.array(offsets)
            for name, values in seq.columns.items():
                taken = pa.array(values[idx]) if isinstance(values, np.ndarray) else values.take(pa.array(idx))
                cols[name] = pa.LargeListArray.from_arrays(pa_offsets, taken)
        for s, off in self.scenario_offsets.items():
            lo, hi = int(off[a]), int(off[b])
            pa_offsets = pa.array(off[a : b + 1] - lo)
            for name, values in self.scenario_columns[s].items():
                cols[name] = pa.LargeListArray.from_arrays(pa_offsets, values.slice(lo, hi - lo))
        return pa.table(cols)


def _window_span(scen: list[_ScenarioRows], window: int) -> tuple[int, int]:
    lo = min(int(r.ts.min()) // window for r in scen if r.ts.size)
    hi = max(int(r.ts.max()) // window for r in scen if r.ts.size)
    return lo, hi - lo + 1


def _distinct_windows(scen: list[_ScenarioRows], window: int, lo: int, n: int) -> np.ndarray:
    """Window ids with at least one exposure (a bincount when the span is small, else unique)."""
    if n <= 50_000_000:
        seen = np.zeros(n, dtype=bool)
        for r in scen:
            seen |= np.bincount(r.ts // window - lo, minlength=n).astype(bool)
        return np.flatnonzero(seen) + lo
    return np.unique(np.concatenate([np.unique(r.ts // window) for r in scen]))


def _collect_exposures(
    tables: Mapping[str, pl.DataFrame], origins: Mapping[str, str], schema: DataSchema, apply_drops: bool
) -> tuple[list[_ScenarioRows], dict[str, int]]:
    """Per scenario: rows kept after the range policy, with user and ts, in source order."""
    out, dropped = [], {"timestamp_out_of_range": 0, "duplicate_exposure": 0}
    for spec in schema.scenarios:
        df = tables[spec.table]
        if apply_drops:
            rows, n_range = _drop_out_of_range(df, schema)
            dropped["timestamp_out_of_range"] += n_range
        else:
            rows = np.arange(len(df), dtype=np.int64)
        user = df[schema.user_column].to_numpy().astype(np.int64, copy=False)
        ts = df[schema.time.column].to_numpy().astype(np.int64, copy=False)
        if rows.size != len(df):
            user, ts = user[rows], ts[rows]
        out.append(_ScenarioRows(spec, origins.get(spec.table, spec.table), df, rows, user, ts,
                                 np.zeros(0, dtype=np.int8)))
    return out, dropped


def _order_exposures(scen: list[_ScenarioRows], users: _Users, boundaries: SplitBoundaries,
                     schema: DataSchema, window_lo: int, n_windows: int, dropped: dict[str, int],
                     apply_drops: bool) -> None:
    """Sort each scenario's rows by (split, user, ts), drop duplicates, set sample keys."""
    for r in scen:
        if r.ts.size == 0:
            r.split, r.sample_key = np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.int64)
            continue
        window = r.ts // schema.window
        split = _split_of(window, schema, boundaries)
        uidx, _ = users.index(r.user)
        t_lo = int(r.ts.min())
        order = _stable_order([split.astype(np.int64), uidx, r.ts - t_lo],
                              [len(SPLITS), users.n, int(r.ts.max()) - t_lo + 1])
        r.rows, r.user, r.ts, split, uidx = r.rows[order], r.user[order], r.ts[order], split[order], uidx[order]
        if apply_drops:
            dup = _duplicate_mask(r.frame, r.rows, r.user, r.ts)
            if dup.any():
                keep = ~dup
                dropped["duplicate_exposure"] += int(dup.sum())
                r.rows, r.user, r.ts, split, uidx = r.rows[keep], r.user[keep], r.ts[keep], split[keep], uidx[keep]
        r.split = split
        r.sample_key = (split.astype(np.int64) * users.n + uidx) * n_windows + (r.ts // schema.window - window_lo)


def _sequence_table(name: str, df: pl.DataFrame, origin: str, schema: DataSchema, users: _Users,
                    window_lo: int, n_windows: int) -> _SequenceTable:
    user = df[schema.user_column].to_numpy().astype(np.int64, copy=False)
    ts = df[schema.time.column].to_numpy().astype(np.int64, copy=False)
    uidx, known = users.index(user)
    rows = np.flatnonzero(known).astype(np.int64)
    uidx, ts = uidx[rows], ts[rows]
    if rows.size:
        t_lo = int(ts.min())
        order = _stable_order([uidx, ts - t_lo], [users.n, int(ts.max()) - t_lo + 1])
        rows, uidx, ts = rows[order], uidx[order], ts[order]
    slot = np.clip(ts // schema.window - window_lo + 1, 0, n_windows + 1)
    return _SequenceTable(name, origin, df, rows, ts, uidx * (n_windows + 2) + slot)


def _sequence_bounds(table: _SequenceTable, sample_uidx: np.ndarray, sample_wrel: np.ndarray,
                     max_len: int, realtime: bool, n_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each sample's H (ts < window start) or R (ts < window end) slice."""
    base = sample_uidx * (n_windows + 2)
    user_start = np.searchsorted(table.key, base, side="left")
    end = np.searchsorted(table.key, base + sample_wrel + (2 if realtime else 1), side="left")
    return np.maximum(user_start, end - max_len).astype(np.int64), end.astype(np.int64)


def _train_mask(ts: np.ndarray, schema: DataSchema, b: SplitBoundaries) -> np.ndarray:
    """Rows whose window starts before the valid boundary: the rows normalisation is fitted on."""
    return (ts // schema.window) * schema.window < b.valid_start


def _encode(feature: Feature, values: pl.Series, key: str, origin: str, train: np.ndarray | None,
            given: Mapping[str, FeatureStats] | None) -> tuple[pa.Array, FeatureStats]:
    if given is not None:
        if key not in given:
            raise KeyError(f"manifest has no encoding statistics for column '{key}'")
        stats = given[key]
    else:
        assert train is not None
        stats = fit_stats(feature, values.filter(pl.Series(train)), origin)
    return encode_feature(feature, values, stats)


def _label_array(frame: pl.DataFrame, rows: np.ndarray, labels: list[str]) -> pa.Array:
    """AND of the label columns with Kleene logic (0 AND missing = 0): int8 1 / 0 / -1 (missing)."""
    if any(c not in frame.columns for c in labels):
        return pa.array(np.full(rows.size, -1, dtype=np.int8))
    bools = []
    for c in labels:
        s = frame[c].gather(rows)
        if s.dtype.is_float():
            s = s.fill_nan(None)
        bools.append(s.cast(pl.Boolean))
    anded = pl.select(pl.all_horizontal(bools)).to_series()
    return anded.cast(pl.Int8).fill_null(-1).to_arrow()


def _oracle_array(frame: pl.DataFrame, rows: np.ndarray, column: str) -> pa.Array:
    if column not in frame.columns:
        return pa.array(np.full(rows.size, np.nan, dtype=np.float32))
    s = frame[column].gather(rows).cast(pl.Float32)
    return s.fill_null(float("nan")).to_arrow()


def _encode_scenarios(scen: list[_ScenarioRows], schema: DataSchema, b: SplitBoundaries,
                      given: Mapping[str, FeatureStats] | None,
                      stats: dict[str, FeatureStats]) -> dict[str, dict[str, pa.Array]]:
    out: dict[str, dict[str, pa.Array]] = {}
    for r in scen:
        spec, cols = r.spec, {}
        cols[f"{scenario_prefix(spec.name)}.ts"] = pa.array(r.ts, type=pa.int64())
        train = r.split == 0 if given is None else None
        features = {f.name: f for group in spec.feature_groups.values() for f in group}
        for group, pairs in scenario_feature_columns(spec).items():
            for fname, col in pairs:
                values = r.frame[fname].gather(r.rows)
                cols[col], stats[col] = _encode(features[fname], values, col, r.origin, train, given)
        for task in spec.tasks:
            cols[label_column(spec.name, task.name)] = _label_array(r.frame, r.rows, task.labels)
        for task in spec.tasks:
            if task.oracle_column is not None:
                cols[oracle_column(spec.name, task.name)] = _oracle_array(r.frame, r.rows, task.oracle_column)
        out[spec.name] = cols
    return out


def _encode_sequences(seqs: list[_SequenceRows], schema: DataSchema, b: SplitBoundaries,
                      given: Mapping[str, FeatureStats] | None, stats: dict[str, FeatureStats]) -> None:
    """Encode each behaviour column once per (table, feature spec), shared by H and R types."""
    cache: dict[tuple[str, str], tuple[np.ndarray | pa.Array, FeatureStats]] = {}
    for seq in seqs:
        t = seq.table
        seq.columns[f"{seq.prefix}.ts"] = t.ts
        train = _train_mask(t.ts, schema, b) if given is None else None
        for feature in seq.spec.features:
            col = f"{seq.prefix}.{feature.name}"
            ck = (t.name, feature.model_dump_json())
            if ck not in cache or given is not None:
                values = t.frame[feature.name].gather(t.rows)
                arr, st = _encode(feature, values, col, t.origin, train, given)
                if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
                    arr = arr.to_numpy(zero_copy_only=False)
                cache[ck] = (arr, st)
            seq.columns[col], stats[col] = cache[ck]


def aggregate(tables: Mapping[str, pl.DataFrame], origins: Mapping[str, str], schema: DataSchema, *,
              boundaries: SplitBoundaries | None = None, given_stats: Mapping[str, FeatureStats] | None = None,
              apply_drops: bool = True, timings: dict[str, float] | None = None) -> Aggregation:
    """Aggregate validated tables into samples (the one code path of training and inference).

    ``boundaries=None``: computed from the schema's split. ``given_stats``: encode with these
    statistics (inference) instead of fitting them on the train split. ``apply_drops=False``:
    no drop policy (requests), every row is kept.
    """
    timings = timings if timings is not None else {}
    clock = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    scen, dropped = _collect_exposures(tables, origins, schema, apply_drops)
    input_exposures = sum(len(tables[s.table]) for s in schema.scenarios)
    if not any(r.ts.size for r in scen):
        raise DataError(f"no exposures left to aggregate (input {input_exposures}, dropped {dropped})")
    window_lo, n_windows = _window_span(scen, schema.window)
    if boundaries is None:
        boundaries = split_boundaries(schema, _distinct_windows(scen, schema.window, window_lo, n_windows))
    users = _Users.build([r.user for r in scen], len(SPLITS) * n_windows)
    _order_exposures(scen, users, boundaries, schema, window_lo, n_windows, dropped, apply_drops)
    tick("sort_exposures")

    keys = np.unique(np.concatenate([r.sample_key[np.r_[True, r.sample_key[1:] != r.sample_key[:-1]]]
                                     for r in scen if r.sample_key.size]))
    per_split = users.n * n_windows
    sample_split = (keys // per_split).astype(np.int8)
    sample_uidx = (keys % per_split) // n_windows
    sample_wrel = keys % n_windows
    offsets = {}
    for r in scen:
        off = np.empty(keys.size + 1, dtype=np.int64)
        off[:-1] = np.searchsorted(r.sample_key, keys, side="left")
        off[-1] = r.sample_key.size
        offsets[r.spec.name] = off
    tick("samples")

    seq_tables: dict[str, _SequenceTable] = {}
    behaviour_users: list[np.ndarray] = []
    for table, specs in sequence_tables(schema).items():
        df = tables[table]
        seq_tables[table] = _sequence_table(table, df, origins.get(table, table), schema, users, window_lo, n_windows)
        behaviour_users.append(df[schema.user_column].unique().to_numpy().astype(np.int64))
    sample_user_ids = users.ids(sample_uidx)
    with_samples = np.unique(sample_user_ids)
    without = 0
    if behaviour_users:
        without = int(np.setdiff1d(np.unique(np.concatenate(behaviour_users)), with_samples).size)
    seqs = []
    for kind, prefix_of, specs in (("H", history_prefix, schema.history), ("R", realtime_prefix, schema.realtime)):
        for spec in specs:
            start, end = _sequence_bounds(seq_tables[spec.table], sample_uidx, sample_wrel, spec.max_len,
                                          kind == "R", n_windows)
            seqs.append(_SequenceRows(prefix_of(spec.name), spec, seq_tables[spec.table], start, end))
    tick("sequences")

    stats: dict[str, FeatureStats] = {}
    scen_cols = _encode_scenarios(scen, schema, boundaries, given_stats, stats)
    _encode_sequences(seqs, schema, boundaries, given_stats, stats)
    tick("encode")
    return Aggregation(
        schema=schema, boundaries=boundaries, users=users, window_lo=window_lo,
        sample_user=sample_user_ids, sample_window=sample_wrel + window_lo, sample_split=sample_split,
        scenario_offsets=offsets, scenario_columns=scen_cols, scenario_rows={r.spec.name: r for r in scen},
        sequences=seqs, stats=stats, dropped=dropped, input_exposures=input_exposures,
        users_without_exposures=without,
    )


# --------------------------------------------------------------------------------------------
# Shards, statistics, manifest
# --------------------------------------------------------------------------------------------


def shard_bounds(weights: np.ndarray, min_shards: int, max_rows: int) -> np.ndarray:
    """Cut points [0, ..., n] of contiguous shards: at least ``min_shards`` (when there are that
    many samples), each holding about ``max_rows`` weight at most (one heavy sample may exceed)."""
    n = weights.size
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    total = int(weights.sum())
    k = min(n, max(min_shards, -(-total // max_rows)))
    i = np.arange(1, k)
    cuts = np.searchsorted(np.cumsum(weights), total * i / k, side="left") + 1
    # Strictly increasing cuts with cut_i in [i, n - k + i] <=> cut_i - i non-decreasing in [0, n - k].
    slack = np.maximum.accumulate(np.clip(cuts - i, 0, n - k))
    return np.r_[0, slack + i, n].astype(np.int64)


def _scenario_info(agg: Aggregation) -> dict[str, ScenarioInfo]:
    out = {}
    for spec in agg.schema.scenarios:
        cols = agg.scenario_columns[spec.name]
        rates, observed = {}, {}
        for task in spec.tasks:
            lab = cols[label_column(spec.name, task.name)].to_numpy(zero_copy_only=False)
            obs = int((lab >= 0).sum())
            observed[task.name] = obs
            rates[task.name] = float((lab == 1).sum() / obs) if obs else None
        out[spec.name] = ScenarioInfo(exposures=int(agg.scenario_offsets[spec.name][-1]), label_rates=rates,
                                      observed_labels=observed)
    return out


def _oracle_table(agg: Aggregation) -> dict[str, dict[str, dict[str, dict]]]:
    """oracle[split][scenario][task] = task_metrics of the true probabilities (observed labels)."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for k, split in enumerate(SPLITS):
        lo_s, hi_s = agg.split_range(k)
        for spec in agg.schema.scenarios:
            off = agg.scenario_offsets[spec.name]
            lo, hi = int(off[lo_s]), int(off[hi_s])
            users = agg.scenario_rows[spec.name].user[lo:hi]
            cols = agg.scenario_columns[spec.name]
            for task in spec.tasks:
                if task.oracle_column is None or hi == lo:
                    continue
                lab = cols[label_column(spec.name, task.name)].slice(lo, hi - lo).to_numpy(zero_copy_only=False)
                prob = cols[oracle_column(spec.name, task.name)].slice(lo, hi - lo).to_numpy(zero_copy_only=False)
                ok = (lab >= 0) & ~np.isnan(prob)
                m = task_metrics(users[ok], lab[ok], prob[ok]).as_dict()
                out.setdefault(split, {}).setdefault(spec.name, {})[task.name] = m
    return out


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work when the output would silently mix with an earlier run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")


def _clear_out_dir(out_dir: Path) -> None:
    """Remove what an earlier prepare wrote (only its own files: split folders and the manifest)."""
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_shards(agg: Aggregation, out_dir: Path, shards: int, max_shard_rows: int,
                  progress: bool) -> dict[str, SplitInfo]:
    """Write every split's shards; two writer threads overlap Parquet encoding with assembly."""
    plan = []
    for k, split in enumerate(SPLITS):
        lo, hi = agg.split_range(k)
        cuts = lo + shard_bounds(agg.sample_weights(lo, hi), shards, max_shard_rows)
        plan += [(split, i, int(cuts[i]), int(cuts[i + 1])) for i in range(cuts.size - 1)]
    infos: dict[str, SplitInfo] = {}
    for k, split in enumerate(SPLITS):
        lo, hi = agg.split_range(k)
        per = {s: int(off[hi] - off[lo]) for s, off in agg.scenario_offsets.items()}
        infos[split] = SplitInfo(samples=hi - lo, exposures=sum(per.values()), scenario_exposures=per, shards=[])
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for split, i, a, b in tqdm(plan, desc="writing shards", unit="shard", disable=not progress):
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            rel = f"{split}/part-{i:05d}.parquet"
            table = agg.table(a, b)
            while len(pending) >= 2:
                pending.pop(0).result()
            pending.append(pool.submit(pq.write_table, table, out_dir / rel, compression="zstd"))
            exposures = sum(int(off[b] - off[a]) for off in agg.scenario_offsets.values())
            infos[split].shards.append(ShardInfo(path=rel, samples=b - a, exposures=exposures))
        for f in pending:
            f.result()
    return infos


def prepare(raw: RawTables, out_dir: str | Path, *, scenarios: list[str] | None = None, shards: int = 1,
            max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS, overwrite: bool = False,
            progress: bool = False) -> Manifest:
    """Validate, aggregate, write shards and ``manifest.json``; return the manifest.

    ``scenarios``: prepare only these scenarios (their tables are read, the others ignored;
    ``input_exposures`` counts the prepared scenarios' rows plus the source's ``pre_dropped``).
    ``shards``: at least this many shards per split (for ``torchrun`` ranks).
    """
    if shards < 1 or max_shard_rows < 1:
        raise ValueError(f"shards ({shards}) and max_shard_rows ({max_shard_rows}) must be >= 1")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    schema = raw.schema if scenarios is None else raw.schema.restrict(scenarios)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    validate_raw(raw, schema)
    timings["validate"] = time.perf_counter() - t0
    agg = aggregate(raw.tables, raw.origins, schema, timings=timings)
    t1 = time.perf_counter()
    _clear_out_dir(out_dir)
    splits = _write_shards(agg, out_dir, shards, max_shard_rows, progress)
    timings["write"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    oracle = _oracle_table(agg)
    timings["oracle"] = time.perf_counter() - t2
    dropped = {k: v for k, v in agg.dropped.items() if v}
    for reason, n in raw.pre_dropped.items():
        dropped[reason] = dropped.get(reason, 0) + int(n)
    manifest = Manifest(
        input_exposures=agg.input_exposures + sum(int(n) for n in raw.pre_dropped.values()),
        output_exposures=sum(int(off[-1]) for off in agg.scenario_offsets.values()),
        dropped=dropped,
        users=int(np.unique(agg.sample_user).size),
        users_without_exposures=agg.users_without_exposures,
        samples=agg.num_samples,
        splits=splits,
        split_boundaries=agg.boundaries,
        scenarios=_scenario_info(agg),
        schema=raw.schema.model_dump(mode="json"),
        scenarios_prepared=schema.scenario_names,
        encoding=agg.stats,
        time_unit=schema.time.unit,
        window=schema.window,
        oracle=oracle,
        source={**{k: v for k, v in raw.info.items()}, "origins": dict(raw.origins)},
        versions={"polars": pl.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    )
    manifest.check_accounting()
    timings["total"] = time.perf_counter() - t0
    manifest.timings_s = {k: round(v, 4) for k, v in timings.items()}
    write_manifest(manifest, out_dir)
    return manifest


# --------------------------------------------------------------------------------------------
# Inference requests
# --------------------------------------------------------------------------------------------


def build_request(tables: RawTables | Mapping[str, pl.DataFrame], manifest: Manifest, user: int, scenario: str,
                  candidates: pl.DataFrame, request_time: int) -> JaggedBatch:
    """One request (one user, one scenario, N candidates) as a one-sample JaggedBatch.

    Runs :func:`aggregate` -- the training code path -- on the user's behaviour rows and the
    candidates as the scenario's exposures, with the manifest's encoding statistics. The request
    belongs to the window containing ``request_time``: H = actions before the window start, R =
    the most recent actions before the window end, exactly as in training, so the behaviour
    tables passed must hold what is known at request time. Candidates may omit the user column
    (filled with ``user``), the time column (filled with ``request_time``, so they keep their
    order) and labels (then masked). The batch holds only ``scenario``; its token groups follow
    ``schema.restrict([scenario]).token_groups()``.
    """
    from mtfm.data.loader import table_to_batch  # the loader's converter, so both share it

    full = manifest.schema_obj
    if scenario not in full.scenario_names:
        raise KeyError(f"unknown scenario {scenario!r}; the prepared data has {full.scenario_names}")
    schema = full.restrict([scenario])
    spec = schema.scenario(scenario)
    frames = tables.tables if isinstance(tables, RawTables) else dict(tables)
    origins = dict(tables.origins) if isinstance(tables, RawTables) else {}
    ucol, tcol = schema.user_column, schema.time.column
    cand = candidates
    if ucol not in cand.columns:
        cand = cand.with_columns(pl.lit(user, dtype=pl.Int64).alias(ucol))
    if tcol not in cand.columns:
        cand = cand.with_columns(pl.lit(request_time, dtype=pl.Int64).alias(tcol))
    origin = f"request(user={user}, scenario={scenario})"
    validate_exposure_table(cand, schema, spec, origin, labels_required=False)
    if len(cand) == 0:
        raise DataError(f"{origin}: no candidates")
    other = cand[ucol] != user
    if other.any():
        raise DataError(f"{origin}: column '{ucol}', row {int(other.arg_max())}: candidates of another user")
    w = request_time // schema.window
    outside = (cand[tcol] // schema.window) != w
    if outside.any():
        raise DataError(f"{origin}: column '{tcol}', row {int(outside.arg_max())}: timestamp outside the "
                        f"request's window [{w * schema.window}, {(w + 1) * schema.window})")
    req_tables: dict[str, pl.DataFrame] = {spec.table: cand}
    req_origins = {spec.table: origin}
    for table, specs in sequence_tables(schema).items():
        if table not in frames:
            raise DataError(f"{origin}: missing behaviour table '{table}' (the schema's sequences read it)")
        req_origins[table] = f"{origins.get(table, table)} (rows of user {user})"
        require_columns(frames[table], [ucol], origins.get(table, table), "behaviour table")
        req_tables[table] = frames[table].filter(pl.col(ucol) == user)
        validate_sequence_table(req_tables[table], schema, specs, req_origins[table])
    far = SplitBoundaries(style="absolute", valid_start=np.iinfo(np.int64).max, test_start=np.iinfo(np.int64).max)
    agg = aggregate(req_tables, req_origins, schema, boundaries=far,
                    given_stats=manifest.encoding, apply_drops=False)
    return table_to_batch(agg.table(0, agg.num_samples), schema)
