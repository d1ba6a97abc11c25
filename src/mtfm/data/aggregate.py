"""User-level multi-scenario aggregation (paper sections 3.1 and 3.3.1) -> Parquet shards.

One aggregated sample = one user and one time window (fixed length ``schema.window``, aligned
on the epoch: window id = ts // window) with at least one exposure in any scenario. It holds:

* every exposure of every scenario in the window, each scenario with its own columns (no
  padding, no alignment), sorted by timestamp (stable: rows with equal timestamps keep their
  order in the source table);
* per history type H: the most recent ``max_len`` actions with ts < window start;
* per real-time type R: the most recent ``max_len`` actions with ts < window start **plus every
  action inside the window** (at most ``max_in_window`` of them, the earliest, when the schema
  caps it; the actions left out are counted per type in ``manifest.json``
  ``realtime_truncated``). Every exposure can then be given exactly what a request at its own
  timestamp would hold: the ``max_len`` most recent actions of each type strictly before it.
  The model's dynamic mask selects that view per token (:mod:`mtfm.model.mask`, from each
  action's expiry, :func:`mtfm.data.batch.realtime_expiry`). Keeping only the ``max_len``
  actions before the window *end* instead (format 2) let an action after an exposure -- its own
  click -- evict an older action the exposure should see: its logit changed with its label;
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

How it stays fast (the target is >= 1M exposures/s on 2 cores): the original rows are never
reordered or copied. Each table gets one order -- by (user, time), stable, found with one
int64 key sort or, for already sorted input, a linear check -- as an index array; features
are encoded column by column in the tables' own row order; sample boundaries come from
``searchsorted`` on (user, window) keys, H/R slices from ``searchsorted`` of (user, window)
in the ordered behaviour table. A shard stores each behaviour row its samples need once per
sequence type, in flat columns (the union of the samples' ranges, found in one pass because
ranges of samples in (user, window) order never move backwards), and each sample's
[start, end) into it (see :mod:`mtfm.data.store`); exposures are list columns, offsets plus
one gather of each encoded column. No Python loop runs over users or samples; two threads
write shards while the next one is gathered.

Inference requests (:func:`build_request`) run the same code with one user, one scenario and
the request's candidates as the exposures of the request's window, and encoding statistics
taken from the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm import tqdm

from mtfm.config import DataSchema, Feature, ScenarioSpec, SequenceSpec
from mtfm.data.batch import JaggedBatch
from mtfm.data.encode import (
    HASH_SEEDS,
    FeatureStats,
    encode_frame,
    fit_frame,
    range_positions,
)
from mtfm.data.output import check_out_dir, remove_stale_staging, staged_output
from mtfm.data.raw import RawTables
from mtfm.data.store import (
    SPLITS,
    Manifest,
    ScenarioInfo,
    SequenceFileInfo,
    ShardDigests,
    ShardInfo,
    ShardTables,
    SplitBoundaries,
    SplitInfo,
    bound_columns,
    history_prefix,
    label_column,
    oracle_column,
    realtime_prefix,
    sample_columns,
    scenario_feature_columns,
    scenario_prefix,
    sequence_path,
    source_row_column,
    write_manifest,
    write_shard,
)
from mtfm.data.side import join_frame, join_side_tables, sides_of
from mtfm.data.timestamps import check_splits_not_empty, frame_to_unit, tables_to_unit, warn_far_timestamps
from mtfm.data.vectors import expand_frame, expand_vectors
from mtfm.data.vocab import (
    VocabularyInfo,
    VocabularySource,
    apply_vocabularies,
    build_vocabulary,
    train_vocabulary_features,
)
from mtfm.data.validate import (
    DataError,
    require_columns,
    sequence_tables,
    validate_exposure_table,
    validate_raw,
    validate_sequence_table,
)
from mtfm.dirlock import hold_dir_lock
from mtfm.errors import UnknownNameError
from mtfm.metrics import task_metrics

DEFAULT_MAX_SHARD_ROWS = 2_000_000  # exposures + sequence items per shard
DEFAULT_ORACLE_SPLITS: tuple[str, ...] = ("valid", "test")
_KEY_LIMIT = 1 << 62  # int64 keys stay below this (headroom for +1 / +2 offsets)
_MAX_LAG_RUN = 32  # longest (user, ts) run checked for duplicates by pairwise lags; longer: hashing


class PhaseTimer:
    """Wall and CPU seconds per phase. CPU time is the whole process's (all threads, from
    ``time.process_time``), so on a shared machine it shows how much of the cores a run got."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())
        self._last = self._start

    def tick(self, name: str) -> None:
        """Close the phase that ran since the previous tick and charge it to ``name``."""
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = self.wall.get(name, 0.0) + now[0] - self._last[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + now[1] - self._last[1]
        self._last = now

    def totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """(wall, cpu) per phase plus ``total`` since construction, rounded for the manifest."""
        now = (time.perf_counter(), time.process_time())
        wall = {**self.wall, "total": now[0] - self._start[0]}
        cpu = {**self.cpu, "total": now[1] - self._start[1]}
        return {k: round(v, 4) for k, v in wall.items()}, {k: round(v, 4) for k, v in cpu.items()}


# --------------------------------------------------------------------------------------------
# Dense user index: lets (user, time) become one order-preserving int64 key
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
    def build(cls, ids: list[np.ndarray], span_per_user: int) -> _Users:
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
            idx = ids - self.lo
            known = (idx >= 0) & (idx < self.n)
            return (idx if known.all() else np.where(known, idx, 0)), known
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), self.n - 1)
        known = self.sorted_ids[pos] == ids
        return np.where(known, pos, 0), known

    def ids(self, index: np.ndarray) -> np.ndarray:
        return index + self.lo if self.sorted_ids is None else self.sorted_ids[index]


def _stable_order(user_index: np.ndarray, ts: np.ndarray, n_users: int) -> np.ndarray | None:
    """Stable argsort by (user index, ts); None when the rows are already in that order.

    Packs both into one int64 key when the ranges allow it (one fast sort, one linear check
    for sorted input), else falls back to a two-column stable sort.
    """
    if ts.size < 2:
        return None
    t_lo = int(ts.min())
    span = int(ts.max()) - t_lo + 1
    if n_users * span < _KEY_LIMIT:
        key = user_index * span + (ts - t_lo)
        if bool(np.all(key[1:] >= key[:-1])):
            return None
        frame = pl.DataFrame({"k": key})
    else:
        later_user = user_index[1:] > user_index[:-1]
        if bool(np.all(later_user | ((user_index[1:] == user_index[:-1]) & (ts[1:] >= ts[:-1])))):
            return None
        frame = pl.DataFrame({"u": user_index, "t": ts})
    order = frame.select(pl.arg_sort_by(frame.columns, maintain_order=True)).to_series()
    return order.to_numpy().astype(np.int64, copy=False)


def _sorted_union(arrays: list[np.ndarray]) -> np.ndarray:
    """Sorted distinct values of several int arrays (a sort, cheaper here than hash-based unique)."""
    c = np.concatenate(arrays)
    c.sort()
    return c[np.r_[True, c[1:] != c[:-1]]] if c.size else c


def _is_identity(rows: np.ndarray, n: int) -> bool:
    """``rows`` (distinct indices into n rows) is exactly 0..n-1 in order."""
    return rows.size == n and (n < 2 or bool(np.all(rows[1:] > rows[:-1])))


def _take_raw(values: np.ndarray | pa.Array, rows: np.ndarray) -> np.ndarray | pa.Array:
    return values[rows] if isinstance(values, np.ndarray) else values.take(pa.array(rows))


def _take(values: np.ndarray | pa.Array, rows: np.ndarray) -> pa.Array:
    taken = _take_raw(values, rows)
    return pa.array(taken) if isinstance(taken, np.ndarray) else taken


# --------------------------------------------------------------------------------------------
# Exposures
# --------------------------------------------------------------------------------------------


@dataclass
class _ScenarioRows:
    """Kept exposures of one scenario, ordered by (user, time) (stable), as original row indices."""

    spec: ScenarioSpec
    origin: str
    frame: pl.DataFrame
    rows: np.ndarray  # original row index of each kept exposure, in (user, ts) order
    user: np.ndarray  # per kept exposure, same order
    ts: np.ndarray
    uidx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sample_key: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    columns: dict[str, np.ndarray | pa.Array] = field(default_factory=dict)  # encoded, original row order
    identity: bool = False  # rows == 0..n-1: sorted input, nothing dropped (gathers skip a step)

    def kept_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.frame), dtype=bool)
        mask[self.rows] = True
        return mask


def _drop_out_of_range(df: pl.DataFrame, schema: DataSchema) -> tuple[np.ndarray, int]:
    """Original row indices with ts in [time.min, time.max), and how many were dropped."""
    ts = df[schema.time.column]
    if schema.time.min is None and schema.time.max is None:
        return np.arange(len(df), dtype=np.int64), 0
    keep = pl.repeat(True, len(df), eager=True)
    if schema.time.min is not None:
        keep = keep & (ts >= schema.time.min)
    if schema.time.max is not None:
        keep = keep & (ts < schema.time.max)
    rows = keep.arg_true().to_numpy().astype(np.int64, copy=False)
    return rows, len(df) - rows.size


def _equal_rows(frame: pl.DataFrame, columns: list[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact row equality of original rows a[k] and b[k] on ``columns`` (nulls and NaNs equal).

    Compares column by column on the still-equal pairs only, so the work shrinks fast.
    """
    alive = np.arange(a.size)
    for col in columns:
        if alive.size == 0:
            break
        s = frame[col]
        if s.dtype.is_numeric() and s.null_count() == 0:
            v = s.to_numpy()
            eq = _equal_values(v[a[alive]], v[b[alive]])
        else:
            eq = s.gather(a[alive]).eq_missing(s.gather(b[alive])).to_numpy()
        alive = alive[eq]
    out = np.zeros(a.size, dtype=bool)
    out[alive] = True
    return out


def _duplicate_mask(frame: pl.DataFrame, rows: np.ndarray, same: np.ndarray, skip: list[str],
                    first: tuple[str, ...] = ()) -> np.ndarray:
    """True for exact duplicate rows (every column equal to an earlier row; the first is kept).

    ``rows`` are ordered stably by (user, ts) and ``same[i]`` says row i + 1 has the (user, ts)
    of row i: duplicates share (user, ts), so they sit in one run of equal (user, ts). Each row
    is compared exactly with the rows 1, 2, ... places before it in its run (``skip``: columns
    equal by construction; ``first``: columns compared first, the ones most likely to differ
    inside a run, such as item features). Runs longer than _MAX_LAG_RUN are grouped by row hash.
    """
    n = rows.size
    dup = np.zeros(n, dtype=bool)
    if not same.any():
        return dup
    starts = np.flatnonzero(np.r_[True, ~same])
    lengths = np.diff(np.r_[starts, n])
    columns = [c for c in dict.fromkeys([*first, *frame.columns]) if c not in skip and c in frame.columns]
    if int(lengths.max()) > _MAX_LAG_RUN:
        return _duplicate_mask_hashed(frame, rows, same, columns)
    pos = np.arange(n) - np.repeat(starts, lengths)
    screen = _screen_column(frame, columns, rows)  # one column in run order: a gather-free pre-filter
    for lag in range(1, int(lengths.max())):
        cand = pos[lag:] >= lag
        if screen is not None:
            cand &= _equal_values(screen[lag:], screen[:-lag])
        i = np.flatnonzero(cand) + lag
        i = i[~dup[i]]
        dup[i[_equal_rows(frame, columns, rows[i], rows[i - lag])]] = True
    return dup


def _equal_values(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x == y) | (np.isnan(x) & np.isnan(y)) if x.dtype.kind == "f" else x == y


def _screen_column(frame: pl.DataFrame, columns: list[str], rows: np.ndarray) -> np.ndarray | None:
    """The first null-free numeric column of ``columns``, in ``rows`` order (None: there is none)."""
    for col in columns:
        s = frame[col]
        if s.dtype.is_numeric() and s.null_count() == 0:
            values = s.to_numpy()
            return values if _is_identity(rows, len(frame)) else values[rows]
    return None


def _duplicate_mask_hashed(frame: pl.DataFrame, rows: np.ndarray, same: np.ndarray, columns: list[str]) -> np.ndarray:
    """Duplicates for long (user, ts) runs: group by (run, 64-bit row hash), then compare each
    row exactly with the previous row of its group, so a collision never drops a distinct row."""
    n = rows.size
    cand = np.zeros(n, dtype=bool)
    cand[1:] |= same
    cand[:-1] |= same
    pos = np.flatnonzero(cand)
    run = np.cumsum(np.r_[True, ~same])[pos]
    hashes = frame.hash_rows(*HASH_SEEDS).to_numpy()[rows[pos]]
    keys = pl.DataFrame({"run": run, "hash": hashes})
    o = keys.select(pl.arg_sort_by("run", "hash", maintain_order=True)).to_series().to_numpy()  # stable
    pair = (run[o][1:] == run[o][:-1]) & (hashes[o][1:] == hashes[o][:-1])
    later, earlier = pos[o][1:][pair], pos[o][:-1][pair]
    dup = np.zeros(n, dtype=bool)
    dup[later[_equal_rows(frame, columns, rows[later], rows[earlier])]] = True
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


def _train_mask(ts: np.ndarray, schema: DataSchema, b: SplitBoundaries) -> np.ndarray:
    """Rows whose window starts before the valid boundary: the rows normalisation is fitted on."""
    return (ts // schema.window) * schema.window < b.valid_start


# --------------------------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------------------------


@dataclass
class _SequenceTable:
    """A behaviour table's rows of users with samples, ordered by (user, ts) (stable)."""

    name: str
    origin: str
    frame: pl.DataFrame
    rows: np.ndarray  # original row index, in (user, ts) order
    ts: np.ndarray  # same order
    key: np.ndarray  # user index * (windows + 2) + clipped window slot; non-decreasing


@dataclass
class _SequenceRows:
    """One sequence type: per sample [start, end) into its ordered behaviour table."""

    prefix: str
    spec: SequenceSpec
    table: _SequenceTable
    start: np.ndarray
    end: np.ndarray
    columns: dict[str, np.ndarray | pa.Array] = field(default_factory=dict)  # encoded, original row order


def _sequence_table(name: str, df: pl.DataFrame, origin: str, schema: DataSchema, users: _Users,
                    window_lo: int, n_windows: int) -> _SequenceTable:
    user = df[schema.user_column].to_numpy().astype(np.int64, copy=False)
    ts = df[schema.time.column].to_numpy().astype(np.int64, copy=False)
    uidx, known = users.index(user)
    rows = np.arange(len(df), dtype=np.int64)
    if not known.all():
        rows = np.flatnonzero(known).astype(np.int64)
        uidx, ts = uidx[rows], ts[rows]
    order = _stable_order(uidx, ts, users.n)
    if order is not None:
        rows, uidx, ts = rows[order], uidx[order], ts[order]
    slot = np.clip(ts // schema.window - window_lo + 1, 0, n_windows + 1)
    return _SequenceTable(name, origin, df, rows, ts, uidx * (n_windows + 2) + slot)


def _sequence_bounds(table: _SequenceTable, sample_uidx: np.ndarray, sample_wrel: np.ndarray,
                     spec: SequenceSpec, realtime: bool, n_windows: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[start, end) of each sample's slice, and how many in-window actions a cap left out.

    H: the ``max_len`` most recent actions with ts < window start. R: the same plus the
    window's own actions (the first ``max_in_window`` of them when capped). Rows of a user are
    ordered by (user, ts) and keyed by window slot, so both are ``searchsorted`` lookups.
    """
    base = sample_uidx * (n_windows + 2)
    user_start = np.searchsorted(table.key, base, side="left")
    window_start = np.searchsorted(table.key, base + sample_wrel + 1, side="left")
    start = np.maximum(user_start, window_start - spec.max_len).astype(np.int64)
    if not realtime:
        return start, window_start.astype(np.int64), 0
    end = np.searchsorted(table.key, base + sample_wrel + 2, side="left")
    truncated = 0
    if spec.max_in_window is not None:
        capped = np.minimum(end, window_start + spec.max_in_window)
        truncated = int((end - capped).sum())
        end = capped
    return start, end.astype(np.int64), truncated


# --------------------------------------------------------------------------------------------
# Encoding (original row order; shards gather from these arrays)
# --------------------------------------------------------------------------------------------


def _stats_for(frame: pl.DataFrame, features: list[tuple[Feature, str]], origin: str, train: np.ndarray | None,
               given: Mapping[str, FeatureStats] | None) -> dict[str, FeatureStats]:
    """Fitted on the train rows (prepare), or taken from the manifest (requests)."""
    if given is None:
        return fit_frame(frame, features, train, origin)
    missing = [key for _, key in features if key not in given]
    if missing:
        raise KeyError(f"manifest has no encoding statistics for column(s) {missing}")
    return {key: given[key] for _, key in features}


def _label_array(frame: pl.DataFrame, labels: list[str]) -> np.ndarray:
    """AND of the label columns with Kleene logic (0 AND missing = 0): int8 1 / 0 / -1 (missing)."""
    if any(c not in frame.columns for c in labels):
        return np.full(len(frame), -1, dtype=np.int8)
    bools = []
    for c in labels:
        s = frame[c]
        if s.dtype.is_float():
            s = s.fill_nan(None)
        bools.append(s.cast(pl.Boolean))
    anded = pl.select(pl.all_horizontal(bools)).to_series()
    return anded.cast(pl.Int8).fill_null(-1).to_numpy()


def _oracle_array(frame: pl.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), np.nan, dtype=np.float32)
    return frame[column].cast(pl.Float32).fill_null(float("nan")).to_numpy()


def _encode_scenario(r: _ScenarioRows, schema: DataSchema, b: SplitBoundaries,
                     given: Mapping[str, FeatureStats] | None, stats: dict[str, FeatureStats]) -> None:
    """Encode the scenario's features, labels and oracles in the table's own row order."""
    spec = r.spec
    kept = None if r.rows.size == len(r.frame) else r.kept_mask()
    train = None
    if given is None:
        train = _train_mask(r.frame[schema.time.column].to_numpy(), schema, b)
        if kept is not None:
            train &= kept
    by_name = {f.name: f for group in spec.feature_groups.values() for f in group}
    features = [(by_name[fname], col) for pairs in scenario_feature_columns(spec).values() for fname, col in pairs]
    columns, counted = encode_frame(r.frame, features, _stats_for(r.frame, features, r.origin, train, given), kept)
    r.columns.update(columns)
    stats.update(counted)
    for task in spec.tasks:
        r.columns[label_column(spec.name, task.name)] = _label_array(r.frame, task.labels)
        if task.oracle_column is not None:
            r.columns[oracle_column(spec.name, task.name)] = _oracle_array(r.frame, task.oracle_column)


def _encode_sequences(seqs: list[_SequenceRows], schema: DataSchema, b: SplitBoundaries,
                      given: Mapping[str, FeatureStats] | None, stats: dict[str, FeatureStats]) -> None:
    """Encode each behaviour table once: a feature read by several types (H and R of one
    table) is encoded once and shared. Counts (OOV, truncation, clipping) cover every row of
    the table. Columns are then put in the table's (user, ts) order, so every shard gathers
    directly by position (sequence items repeat across a user's windows)."""
    by_table: dict[str, list[_SequenceRows]] = {}
    for seq in seqs:
        by_table.setdefault(seq.table.name, []).append(seq)
    for group in by_table.values():
        t = group[0].table
        unique: dict[str, tuple[Feature, str]] = {}  # feature spec -> (feature, first column key)
        for seq in group:
            for f in seq.spec.features:
                unique.setdefault(f.model_dump_json(), (f, f"{seq.prefix}.{f.name}"))
        features = list(unique.values())
        train = _train_mask(t.frame[schema.time.column].to_numpy(), schema, b) if given is None else None
        columns, counted = encode_frame(t.frame, features, _stats_for(t.frame, features, t.origin, train, given))
        if not _is_identity(t.rows, len(t.frame)):
            columns = {k: _take_raw(v, t.rows) for k, v in columns.items()}
        for seq in group:
            for f in seq.spec.features:
                key = unique[f.model_dump_json()][1]
                seq.columns[f"{seq.prefix}.{f.name}"] = columns[key]
                stats[f"{seq.prefix}.{f.name}"] = counted[key]


# --------------------------------------------------------------------------------------------
# The aggregation (shared by prepare and build_request)
# --------------------------------------------------------------------------------------------


@dataclass
class Aggregation:
    """Every sample's bounds and every encoded column; ``shard(samples)`` assembles samples."""

    schema: DataSchema
    boundaries: SplitBoundaries
    users: _Users
    sample_user: np.ndarray  # samples in (user, window) order
    sample_window: np.ndarray  # window id
    sample_split: np.ndarray  # int8 0 train, 1 valid, 2 test
    scenario_offsets: dict[str, np.ndarray]  # [samples + 1] positions in the scenario's ordered rows
    scenario_rows: dict[str, _ScenarioRows]
    sequences: list[_SequenceRows]
    stats: dict[str, FeatureStats]
    dropped: dict[str, int]
    input_exposures: int
    users_without_exposures: int
    realtime_truncated: dict[str, int] = field(default_factory=dict)  # R type -> actions its cap left out
    # vocabulary key -> (built list, report) for ``vocabulary: train`` features (mtfm.data.vocab)
    vocabularies: dict[str, tuple[list, VocabularyInfo]] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.sample_user.size)

    def split_samples(self, split: int) -> np.ndarray:
        """Indices of the split's samples, in (user, window) order."""
        return np.flatnonzero(self.sample_split == split)

    def exposures_of(self, samples: np.ndarray) -> dict[str, int]:
        return {s: int((off[samples + 1] - off[samples]).sum()) for s, off in self.scenario_offsets.items()}

    def sample_weights(self, samples: np.ndarray) -> np.ndarray:
        """Exposures + sequence items of each sample (as if each sample stored its own copy):
        the shard size measure. Kept from format 1 so that shard cuts, and with them the
        shuffled order of a (seed, epoch), do not depend on the storage layout."""
        w = np.zeros(samples.size, dtype=np.int64)
        for off in self.scenario_offsets.values():
            w += off[samples + 1] - off[samples]
        for seq in self.sequences:
            w += seq.end[samples] - seq.start[samples]
        return w

    def shard(self, samples: np.ndarray) -> ShardTables:
        """The given samples in the store's layout (see mtfm.data.store): the sample table, and
        per sequence type the union of the samples' ranges with each sample's [start, end)
        into it."""
        cols: dict[str, pa.Array] = {
            "user_id": pa.array(self.sample_user[samples], type=pa.int64()),
            "window_start": pa.array(self.sample_window[samples] * self.schema.window, type=pa.int64()),
        }
        sequences: dict[str, pa.Table] = {}
        for seq in self.sequences:
            start, end = seq.start[samples], seq.end[samples]
            rows = union_rows(start, end)
            first = np.searchsorted(rows, start).astype(np.int64)
            lo, hi = bound_columns(seq.prefix)
            cols[lo], cols[hi] = pa.array(first), pa.array(first + (end - start))
            flat = {"ts": pa.array(seq.table.ts[rows])}
            for f in seq.spec.features:  # already in the table's (user, ts) order
                flat[f.name] = _take(seq.columns[f"{seq.prefix}.{f.name}"], rows)
            sequences[seq.prefix] = pa.table(flat)
        for s, off in self.scenario_offsets.items():
            r = self.scenario_rows[s]
            offsets, pos = range_positions(off[samples], off[samples + 1])
            pa_offsets = pa.array(offsets)
            cols[f"{scenario_prefix(s)}.ts"] = pa.LargeListArray.from_arrays(pa_offsets, pa.array(r.ts[pos]))
            rows = pos if r.identity else r.rows[pos]
            cols[source_row_column(s)] = pa.LargeListArray.from_arrays(pa_offsets, pa.array(rows, type=pa.int64()))
            for name, values in r.columns.items():
                cols[name] = pa.LargeListArray.from_arrays(pa_offsets, _take(values, rows))
        samples_table = pa.table({name: cols[name] for name in sample_columns(self.schema)})
        return ShardTables(samples_table, sequences)


def union_rows(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Sorted distinct positions covered by the ranges [start_i, end_i).

    Samples in (user, window) order have non-decreasing starts and ends (per user, both grow
    with the window; a later user's rows come later), so each range adds only
    [max(start_i, end_{i-1}), end_i): one pass, no sort. Other orders fall back to a sort.
    """
    if start.size > 1 and not (np.all(start[1:] >= start[:-1]) and np.all(end[1:] >= end[:-1])):
        return np.unique(range_positions(start, end)[1])
    if start.size == 0:
        return np.zeros(0, dtype=np.int64)
    new_start = np.maximum(start, np.r_[start[:1], end[:-1]])
    return range_positions(new_start, np.maximum(new_start, end))[1]


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
        out.append(_ScenarioRows(spec, origins.get(spec.table, spec.table), df, rows, user, ts))
    return out, dropped


def _order_exposures(scen: list[_ScenarioRows], users: _Users, schema: DataSchema, window_lo: int,
                     n_windows: int, dropped: dict[str, int], apply_drops: bool) -> None:
    """Order each scenario's rows by (user, ts), drop exact duplicates, set sample keys."""
    skip = [schema.user_column, schema.time.column]
    for r in scen:
        first = tuple(f.name for f in r.spec.item_features) + tuple(f.name for f in r.spec.cross_features)
        uidx, _ = users.index(r.user)
        order = _stable_order(uidx, r.ts, users.n)
        if order is not None:
            r.rows, r.user, r.ts, uidx = r.rows[order], r.user[order], r.ts[order], uidx[order]
        if apply_drops and r.ts.size > 1:
            same = (uidx[1:] == uidx[:-1]) & (r.ts[1:] == r.ts[:-1])
            dup = _duplicate_mask(r.frame, r.rows, same, skip, first)
            if dup.any():
                keep = ~dup
                dropped["duplicate_exposure"] += int(dup.sum())
                r.rows, r.user, r.ts, uidx = r.rows[keep], r.user[keep], r.ts[keep], uidx[keep]
        r.uidx, r.identity = uidx, _is_identity(r.rows, len(r.frame))
        r.sample_key = uidx * n_windows + (r.ts // schema.window - window_lo)


def aggregate(tables: Mapping[str, pl.DataFrame], origins: Mapping[str, str], schema: DataSchema, *,
              boundaries: SplitBoundaries | None = None, given_stats: Mapping[str, FeatureStats] | None = None,
              apply_drops: bool = True, timer: PhaseTimer | None = None) -> Aggregation:
    """Aggregate validated tables into samples (the one code path of training and inference).

    ``boundaries=None``: computed from the schema's split. ``given_stats``: encode with these
    statistics (inference) instead of fitting them on the train split. ``apply_drops=False``:
    no drop policy (requests), every row is kept.
    """
    timer = timer or PhaseTimer()
    tick = timer.tick
    scen, dropped = _collect_exposures(tables, origins, schema, apply_drops)
    input_exposures = sum(len(tables[s.table]) for s in schema.scenarios)
    if not any(r.ts.size for r in scen):
        raise DataError(f"no exposures left to aggregate (input {input_exposures}, dropped {dropped})")
    window_lo, n_windows = _window_span(scen, schema.window)
    if boundaries is None:
        windows = _distinct_windows(scen, schema.window, window_lo, n_windows)
        boundaries = split_boundaries(schema, windows)
        check_splits_not_empty(windows, schema.window, schema.time.unit, boundaries.valid_start,
                               boundaries.test_start, boundaries.style == "absolute")
    users = _Users.build([r.user for r in scen if r.user.size], n_windows + 2)
    _order_exposures(scen, users, schema, window_lo, n_windows, dropped, apply_drops)
    tick("order_exposures")

    run_starts = [r.sample_key[np.r_[True, r.sample_key[1:] != r.sample_key[:-1]]] for r in scen if r.sample_key.size]
    keys = _sorted_union(run_starts)
    sample_uidx, sample_wrel = keys // n_windows, keys % n_windows
    offsets = {}
    for r in scen:
        off = np.empty(keys.size + 1, dtype=np.int64)
        off[:-1] = np.searchsorted(r.sample_key, keys, side="left")
        off[-1] = r.sample_key.size
        offsets[r.spec.name] = off
    tick("samples")

    seq_tables: dict[str, _SequenceTable] = {}
    behaviour_users: list[np.ndarray] = []
    for table in sequence_tables(schema):
        df = tables[table]
        seq_tables[table] = _sequence_table(table, df, origins.get(table, table), schema, users, window_lo, n_windows)
        behaviour_users.append(df[schema.user_column].unique().to_numpy().astype(np.int64))
    sample_user_ids = users.ids(sample_uidx)
    without = 0
    if behaviour_users:
        with_samples = sample_user_ids[np.r_[True, sample_user_ids[1:] != sample_user_ids[:-1]]]  # ordered by user
        seen = _sorted_union(behaviour_users)
        without = int(seen.size - np.isin(seen, with_samples, assume_unique=True).sum())
    seqs = []
    truncated: dict[str, int] = {}
    for kind, prefix_of, specs in (("H", history_prefix, schema.history), ("R", realtime_prefix, schema.realtime)):
        for spec in specs:
            start, end, cut = _sequence_bounds(seq_tables[spec.table], sample_uidx, sample_wrel, spec,
                                               kind == "R", n_windows)
            seqs.append(_SequenceRows(prefix_of(spec.name), spec, seq_tables[spec.table], start, end))
            if spec.max_in_window is not None:
                truncated[spec.name] = cut
    tick("sequences")

    vocabularies: dict[str, tuple[list, VocabularyInfo]] = {}
    if given_stats is None and train_vocabulary_features(schema):
        vocabularies = _train_vocabularies(scen, seq_tables, schema, boundaries)
        schema = apply_vocabularies(schema, {k: v for k, (v, _) in vocabularies.items()})
        for r in scen:
            r.spec = schema.scenario(r.spec.name)
        specs = {s.name: s for s in (*schema.history, *schema.realtime)}
        for seq in seqs:
            seq.spec = specs[seq.spec.name]
        tick("vocabularies")

    stats: dict[str, FeatureStats] = {}
    for r in scen:
        _encode_scenario(r, schema, boundaries, given_stats, stats)
    _encode_sequences(seqs, schema, boundaries, given_stats, stats)
    tick("encode")
    window = sample_wrel + window_lo
    return Aggregation(
        schema=schema, boundaries=boundaries, users=users, sample_user=sample_user_ids, sample_window=window,
        sample_split=_split_of(window, schema, boundaries), scenario_offsets=offsets,
        scenario_rows={r.spec.name: r for r in scen}, sequences=seqs, stats=stats, dropped=dropped,
        input_exposures=input_exposures, users_without_exposures=without, realtime_truncated=truncated,
        vocabularies=vocabularies,
    )


def _train_vocabularies(scen: list[_ScenarioRows], seq_tables: dict[str, _SequenceTable], schema: DataSchema,
                        b: SplitBoundaries) -> dict[str, tuple[list, VocabularyInfo]]:
    """Build every ``vocabulary: train`` (:mod:`mtfm.data.vocab`): from each scenario's kept
    exposures and each behaviour table's rows (a table's column counted once), split by window."""
    rows = {r.spec.name: r for r in scen}
    sources: dict[str, list[VocabularySource]] = {}
    seen: set[tuple[str, str]] = set()
    for key, path, feat in train_vocabulary_features(schema):
        kind, _, rest = path.partition("[")
        owner = rest.split("]", 1)[0]
        if kind == "scenarios":
            r = rows[owner]
            values = r.frame[feat.name] if r.identity else r.frame[feat.name].gather(r.rows)
            split = _split_of(r.ts // schema.window, schema, b)
        else:
            spec = next(s for s in (*schema.history, *schema.realtime) if s.name == owner)
            if (spec.table, feat.name) in seen:
                continue
            seen.add((spec.table, feat.name))
            frame = seq_tables[spec.table].frame
            values = frame[feat.name]
            split = _split_of(frame[schema.time.column].to_numpy() // schema.window, schema, b)
        sources.setdefault(key, []).append(VocabularySource(path, feat, values, split))
    return {key: build_vocabulary(key, src) for key, src in sources.items()}


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
        r = agg.scenario_rows[spec.name]
        rates, observed = {}, {}
        for task in spec.tasks:
            lab = r.columns[label_column(spec.name, task.name)][r.rows]
            obs = int((lab >= 0).sum())
            observed[task.name] = obs
            rates[task.name] = float((lab == 1).sum() / obs) if obs else None
        out[spec.name] = ScenarioInfo(exposures=int(r.rows.size), label_rates=rates, observed_labels=observed)
    return out


def _split_label_rates(agg: Aggregation) -> dict[str, dict[str, dict[str, float | None]]]:
    """rates[split][scenario][task]: positives / observed labels of the split's exposures."""
    out: dict[str, dict[str, dict[str, float | None]]] = {name: {} for name in SPLITS}
    for spec in agg.schema.scenarios:
        r = agg.scenario_rows[spec.name]
        split = _split_of(r.ts // agg.schema.window, agg.schema, agg.boundaries)
        for task in spec.tasks:
            lab = r.columns[label_column(spec.name, task.name)][r.rows]
            observed = np.bincount(split[lab >= 0], minlength=len(SPLITS))
            positive = np.bincount(split[lab == 1], minlength=len(SPLITS))
            for k, name in enumerate(SPLITS):
                rate = float(positive[k] / observed[k]) if observed[k] else None
                out[name].setdefault(spec.name, {})[task.name] = rate
    return out


def _oracle_table(agg: Aggregation, splits: tuple[str, ...]) -> dict[str, dict[str, dict[str, dict]]]:
    """oracle[split][scenario][task] = task_metrics of the true probabilities (observed labels)."""
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for spec in agg.schema.scenarios:
        r = agg.scenario_rows[spec.name]
        if not any(t.oracle_column is not None for t in spec.tasks) or r.rows.size == 0:
            continue
        split = _split_of(r.ts // agg.schema.window, agg.schema, agg.boundaries)
        for k, name in enumerate(SPLITS):
            if name not in splits or not (split == k).any():
                continue
            rows = r.rows[split == k]
            users = r.user[split == k]
            for task in spec.tasks:
                if task.oracle_column is None:
                    continue
                lab = r.columns[label_column(spec.name, task.name)][rows]
                prob = r.columns[oracle_column(spec.name, task.name)][rows]
                ok = (lab >= 0) & ~np.isnan(prob)
                m = task_metrics(users[ok], lab[ok], prob[ok]).as_dict()
                out.setdefault(name, {}).setdefault(spec.name, {})[task.name] = m
    return {name: out[name] for name in SPLITS if name in out}


def _write_shards(agg: Aggregation, out_dir: Path, shards: int, max_shard_rows: int,
                  progress: bool) -> dict[str, SplitInfo]:
    """Write every split's shards; two writer threads overlap Parquet encoding with gathering."""
    plan = []
    infos: dict[str, SplitInfo] = {}
    for k, split in enumerate(SPLITS):
        members = agg.split_samples(k)
        cuts = shard_bounds(agg.sample_weights(members), shards, max_shard_rows)
        plan += [(split, i, members[cuts[i]:cuts[i + 1]]) for i in range(cuts.size - 1)]
        per = agg.exposures_of(members)
        infos[split] = SplitInfo(samples=int(members.size), exposures=sum(per.values()), scenario_exposures=per,
                                 shards=[])
    pending: list[tuple[ShardInfo, Future]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for split, i, samples in tqdm(plan, desc="writing shards", unit="shard", disable=not progress):
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            rel = f"{split}/part-{i:05d}.parquet"
            shard = agg.shard(samples)
            while len(pending) >= 2:
                _record_digests(*pending.pop(0))
            seq_info = {}
            for seq in agg.sequences:
                items = int((seq.end[samples] - seq.start[samples]).sum())
                seq_info[seq.prefix] = SequenceFileInfo(path=str(sequence_path(rel, seq.prefix)),
                                                        rows=shard.sequences[seq.prefix].num_rows, items=items)
            info = ShardInfo(path=rel, samples=int(samples.size), exposures=sum(agg.exposures_of(samples).values()),
                             sequences=seq_info)
            infos[split].shards.append(info)
            pending.append((info, pool.submit(write_shard, shard, out_dir / rel)))
        for info, future in pending:
            _record_digests(info, future)
    return infos


def _record_digests(info: ShardInfo, written: Future) -> None:
    """Wait for a shard's write and put its files' sizes and checksums into its manifest entry."""
    digests: ShardDigests = written.result()
    info.size, info.checksum = digests.samples
    for prefix, digest in digests.sequences.items():
        info.sequences[prefix].size, info.sequences[prefix].checksum = digest


def prepare(raw: RawTables, out_dir: str | Path, *, scenarios: list[str] | None = None, shards: int = 1,
            max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS, oracle_splits: tuple[str, ...] = DEFAULT_ORACLE_SPLITS,
            overwrite: bool = False, progress: bool = False) -> Manifest:
    """Validate, aggregate, write shards and ``manifest.json``; return the manifest.

    ``scenarios``: prepare only these scenarios (their tables are read, the others ignored;
    ``input_exposures`` counts the prepared scenarios' rows plus the source's ``pre_dropped``).
    ``shards``: at least this many shards per split (for ``torchrun`` ranks).
    ``oracle_splits``: splits whose oracle AUC/GAUC table is computed. Default valid and test,
    the splits a model is evaluated on: the ceiling matters there, and the train split (most
    of the rows) would cost more than the aggregation itself.

    ``out_dir`` is locked for the call (:mod:`mtfm.dirlock`: a second prepare or train there
    fails at once) and written through a staging directory swapped in only when complete
    (:mod:`mtfm.data.output`): with ``overwrite``, a failure leaves the old output intact.
    """
    if shards < 1 or max_shard_rows < 1:
        raise ValueError(f"shards ({shards}) and max_shard_rows ({max_shard_rows}) must be >= 1")
    unknown = [s for s in oracle_splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown oracle split(s) {unknown}; the splits are {list(SPLITS)}")
    out_dir = Path(out_dir).resolve()  # a symlinked --out: its target is replaced, the link kept
    with hold_dir_lock(out_dir, "mtfm prepare"):
        check_out_dir(out_dir, overwrite)
        remove_stale_staging(out_dir)
        with staged_output(out_dir) as staging:
            return _prepare_into(staging, raw, scenarios, shards, max_shard_rows, oracle_splits, progress)


def _prepare_into(out_dir: Path, raw: RawTables, scenarios: list[str] | None, shards: int, max_shard_rows: int,
                  oracle_splits: tuple[str, ...], progress: bool) -> Manifest:
    """:func:`prepare`'s work, into an empty directory (the staging directory)."""
    timer = PhaseTimer()
    schema = raw.schema if scenarios is None else raw.schema.restrict(scenarios)
    files = dict(raw.files)  # the source's files for beside the manifest (the synthetic world's schema.yaml)
    raw = expand_vectors(join_side_tables(tables_to_unit(raw, schema), schema), schema)
    validate_raw(raw, schema)
    for table in dict.fromkeys([s.table for s in schema.scenarios] + list(sequence_tables(schema))):
        warn_far_timestamps(raw.tables[table], schema.time.column, schema.time.unit, raw.origin(table), schema.window)
    timer.tick("validate")
    agg = aggregate(raw.tables, raw.origins, schema, timer=timer)
    # The oracle table (sorts in numpy / scikit-learn, which release the GIL) runs beside the
    # shard writes: "write" is charged the CPU of both, "oracle" only the wait that is left.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtfm-oracle") as side:
        oracle_future = side.submit(_oracle_table, agg, oracle_splits)
        splits = _write_shards(agg, out_dir, shards, max_shard_rows, progress)
        timer.tick("write")
        oracle = oracle_future.result()
    for name, rates in _split_label_rates(agg).items():
        splits[name].label_rates = rates
    timer.tick("oracle")
    dropped = {k: v for k, v in agg.dropped.items() if v}
    for reason, n in raw.pre_dropped.items():
        dropped[reason] = dropped.get(reason, 0) + int(n)
    manifest = Manifest(
        input_exposures=agg.input_exposures + sum(int(n) for n in raw.pre_dropped.values()),
        output_exposures=sum(r.rows.size for r in agg.scenario_rows.values()),
        dropped=dropped,
        users=int(np.count_nonzero(np.diff(agg.sample_user)) + 1),  # samples are ordered by user
        users_without_exposures=agg.users_without_exposures,
        realtime_truncated=agg.realtime_truncated,
        samples=agg.num_samples,
        splits=splits,
        split_boundaries=agg.boundaries,
        scenarios=_scenario_info(agg),
        schema=apply_vocabularies(raw.schema, {k: v for k, (v, _) in agg.vocabularies.items()}).model_dump(mode="json"),
        vocabularies={k: info for k, (_, info) in agg.vocabularies.items()},
        scenarios_prepared=schema.scenario_names,
        encoding=agg.stats,
        time_unit=schema.time.unit,
        window=schema.window,
        oracle=oracle,
        source={**{k: v for k, v in raw.info.items()}, "origins": dict(raw.origins)},
        versions={"polars": pl.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    )
    manifest.check_accounting()
    manifest.check_counts()
    manifest.timings_s, manifest.cpu_s = timer.totals()
    for name, text in files.items():
        (out_dir / name).write_text(text)
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
    the ``max_len`` actions before the window start plus the window's own actions, exactly as
    in training, so the behaviour tables passed must hold what is known at request time (later
    rows would be masked anyway: a candidate sees only actions strictly before its timestamp,
    the ``max_len`` most recent of each type). Each candidate thus gets the inputs, and the
    logits, that the training sample gives an exposure at the same time. Candidates may omit the user column
    (filled with ``user``), the time column (filled with ``request_time``, so they keep their
    order) and labels (then masked). The batch holds only ``scenario``; its token groups follow
    ``schema.restrict([scenario]).token_groups()``.
    """
    from mtfm.data.loader import LoadedShard  # the loader's converter, so both share it

    full = manifest.schema_obj
    if scenario not in full.scenario_names:
        raise UnknownNameError(f"unknown scenario {scenario!r}; the prepared data has {full.scenario_names}")
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
    cand = frame_to_unit(cand, tcol, schema.time.unit, origin)
    sides, side_features = sides_of(schema, spec.table)
    cand = join_frame(cand, origin, sides, side_features, frames, origins) if sides else cand
    cand = expand_frame(cand, spec, origin)
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
        req_tables[table] = frame_to_unit(frames[table].filter(pl.col(ucol) == user), tcol, schema.time.unit,
                                          req_origins[table])
        sides, side_features = sides_of(schema, table)
        if sides:
            req_tables[table] = join_frame(req_tables[table], req_origins[table], sides, side_features, frames,
                                           origins)
        validate_sequence_table(req_tables[table], schema, specs, req_origins[table])
    far = SplitBoundaries(style="absolute", valid_start=np.iinfo(np.int64).max, test_start=np.iinfo(np.int64).max)
    agg = aggregate(req_tables, req_origins, schema, boundaries=far,
                    given_stats=manifest.encoding, apply_drops=False)
    everything = np.arange(agg.num_samples)
    return LoadedShard(agg.shard(everything), schema, origin).batch(everything)
