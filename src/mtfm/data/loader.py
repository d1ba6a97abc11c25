"""Loader: prepared shards -> :class:`~mtfm.data.batch.JaggedBatch`, without padding.

The loader takes no feature decision (everything was encoded by ``mtfm prepare``); it reads a
whole shard (:func:`mtfm.data.store.read_shard`) and turns it into a :class:`LoadedShard`:

* exposures (the sample file's list columns): Arrow gathers a batch's samples (``Table.take``
  in C++, or a zero-copy ``slice`` when they are contiguous, as without shuffling) and the
  buffers become tensors through DLPack (``torch.from_dlpack``) -- list offsets are int64
  (``large_list``), so offsets, timestamps and numeric values reach the model without a copy;
* behaviour sequences (H and R): each type's flat columns become tensors once per shard
  (ids widened to int64 once), and a batch's :class:`~mtfm.data.batch.SequenceBatch` is one
  vectorised gather: the samples' [start, end) ranges are concatenated
  (:func:`mtfm.data.encode.range_positions`: offsets from the lengths, positions = repeat of
  the shifted starts + arange; no Python loop over samples) and index every column.

New memory per batch: the gathered sequence rows, exposure ids (stored int32, widened to the
model's int64), the label matrix and mask, and rebased offsets of sliced lists.

Order: deterministic for ``(seed, epoch)``. With ``shuffle`` the rank's shards are visited in
a permuted order and samples are permuted within each shard (a shard is read once per epoch);
batches are consecutive runs of ``batch_size`` samples of that stream, so a batch may span two
shards. ``iterate(epoch, start_batch)`` resumes a stream exactly (shards wholly before the
start are not read).

Distributed (``torchrun``): rank ``r`` of ``w`` reads shards ``r, r + w, r + 2w, ...`` of the
split (round robin); fewer shards than ranks is an error (prepare with ``--shards N``). Ranks
may get different batch counts; ``num_batches`` lets a trainer agree on a common count.

``scenarios=[...]`` reads only those scenarios' columns; samples with no exposure in them are
skipped and counted (``skipped_samples``). The batches then follow the restricted schema
(``loader.schema``): ``batch.scenarios`` holds only the kept scenarios and token group ids follow
``loader.schema.token_groups()``. ``drop_inputs=["history", "realtime", "cross"]`` (any of them)
leaves those inputs out the same way (:meth:`mtfm.config.DataSchema.without`; input ablations).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtfm.config import (
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    SchemaError,
    SequenceSpec,
)
from mtfm.data.batch import (
    FeatureTensors,
    JaggedBatch,
    ScenarioBatch,
    SequenceBatch,
    build_token_layout,
    realtime_expiry,
)
from mtfm.data.encode import range_positions
from mtfm.data.store import (
    MANIFEST_NAME,
    Manifest,
    ShardTables,
    bound_columns,
    check_shard_files,
    label_column,
    oracle_column,
    read_manifest,
    read_shard,
    sample_columns,
    scenario_feature_columns,
    scenario_prefix,
    sequence_types,
    shard_field,
    source_row_column,
)
from mtfm.errors import UnknownNameError

_TORCH_DTYPES = {pa.int64(): torch.int64, pa.int32(): torch.int32, pa.float32(): torch.float32, pa.int8(): torch.int8}


# --------------------------------------------------------------------------------------------
# Arrow -> tensors
# --------------------------------------------------------------------------------------------


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _tensor(arr: pa.Array, name: str) -> torch.Tensor:
    """A primitive Arrow array as a tensor sharing its buffer (no copy)."""
    if arr.null_count:
        raise ValueError(f"column '{name}' holds {arr.null_count} null(s); prepared shards never do (corrupt shard?)")
    dtype = _TORCH_DTYPES.get(arr.type)
    if dtype is None:
        raise ValueError(f"column '{name}' has type {arr.type}; expected one of {list(_TORCH_DTYPES)}")
    if len(arr) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.from_dlpack(arr)  # shares the Arrow buffer (slices included) and keeps it alive


def _list_parts(arr: pa.Array, name: str) -> tuple[torch.Tensor, pa.Array]:
    """(offsets long [n + 1] starting at 0, values) of a large_list array, sliced or not."""
    if not pa.types.is_large_list(arr.type):
        raise ValueError(f"column '{name}' has type {arr.type}; expected a large_list column")
    if arr.null_count:
        raise ValueError(f"column '{name}' holds null lists; prepared shards never do (corrupt shard?)")
    offsets = _tensor(arr.offsets, name)
    start = int(offsets[0]) if offsets.numel() else 0
    end = int(offsets[-1]) if offsets.numel() else 0
    if start != 0:
        offsets = offsets - start
    return offsets, arr.values.slice(start, end - start)


@dataclass
class _Group:
    """Columns that share one list length per sample (a scenario or a sequence type)."""

    offsets: torch.Tensor
    values: dict[str, pa.Array]


def _group(table: pa.Table, columns: list[str]) -> _Group:
    offsets, values = None, {}
    for name in columns:
        off, vals = _list_parts(_array(table.column(name)), name)
        if offsets is None:
            offsets = off
        elif not torch.equal(off, offsets):
            raise ValueError(f"column '{name}' has list lengths that differ from '{columns[0]}' (corrupt shard?)")
        values[name] = vals
    assert offsets is not None
    return _Group(offsets, values)


def _features(group: _Group, pairs: list[tuple[Feature, str]]) -> FeatureTensors:
    out = FeatureTensors()
    for feature, col in pairs:
        arr = group.values[col]
        if isinstance(feature, NumericFeature):
            out.numeric[feature.name] = _tensor(arr, col)
        elif isinstance(feature, MultiCategoricalFeature):
            inner_offsets, inner_values = _list_parts(arr, col)
            out.multi[feature.name] = (_tensor(inner_values, col).long(), inner_offsets)
        else:
            out.categorical[feature.name] = _tensor(arr, col).long()  # stored int32: widened (a copy)
    return out


def _scenario(table: pa.Table, schema: DataSchema, name: str) -> ScenarioBatch:
    spec = schema.scenario(name)
    p = scenario_prefix(name)
    named = scenario_feature_columns(spec)
    by_name = {g: {f.name: f for f in feats} for g, feats in spec.feature_groups.items()}
    pairs = {g: [(by_name[g][fname], col) for fname, col in named[g]] for g in named}
    labels = [label_column(name, t.name) for t in spec.tasks]
    oracles = [oracle_column(name, t.name) for t in spec.tasks if t.oracle_column is not None]
    cols = [f"{p}.ts", source_row_column(name)] + [c for g in pairs.values() for _, c in g] + labels + oracles
    group = _group(table, cols)
    n = int(group.offsets[-1])
    lab = torch.stack([_tensor(group.values[c], c) for c in labels], dim=1) if labels else torch.zeros(n, 0)
    oracle = torch.full((n, len(spec.tasks)), float("nan"), dtype=torch.float32)
    for k, task in enumerate(spec.tasks):
        if task.oracle_column is not None:
            col = oracle_column(name, task.name)
            oracle[:, k] = _tensor(group.values[col], col)
    return ScenarioBatch(
        offsets=group.offsets,
        timestamps=_tensor(group.values[f"{p}.ts"], f"{p}.ts"),
        user=_features(group, pairs["user"]),
        cross=_features(group, pairs["cross"]),
        item=_features(group, pairs["item"]),
        labels=(lab == 1).to(torch.float32),
        label_mask=lab >= 0,
        oracle=oracle,
        source_row=_tensor(group.values[source_row_column(name)], source_row_column(name)).long(),
    )


@dataclass
class _FlatSequence:
    """One sequence type of a loaded shard: each sample's [start, end) and the flat columns."""

    start: np.ndarray  # int64 [samples]
    end: np.ndarray  # int64 [samples]
    ts: torch.Tensor  # long [rows]
    features: FeatureTensors  # [rows]; multi: (values, offsets [rows + 1])

    @classmethod
    def from_tables(cls, samples: pa.Table, flat: pa.Table, prefix: str, spec: SequenceSpec,
                    origin: str) -> _FlatSequence:
        """Arrow -> tensors (zero-copy where the dtype already fits); checks every range."""
        lo, hi = bound_columns(prefix)
        start = _tensor(_array(samples.column(lo)), f"{origin}: {lo}").numpy()
        end = _tensor(_array(samples.column(hi)), f"{origin}: {hi}").numpy()
        bad = (start < 0) | (end < start) | (end > flat.num_rows)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{origin}: columns '{lo}'/'{hi}', row {row}: range [{int(start[row])}, "
                             f"{int(end[row])}) outside the {flat.num_rows} rows of the {prefix} file (corrupt shard?)")
        features = FeatureTensors()
        for f in spec.features:
            arr, name = _array(flat.column(f.name)), f"{origin} {prefix}: {f.name}"
            if isinstance(f, NumericFeature):
                features.numeric[f.name] = _tensor(arr, name)
            elif isinstance(f, MultiCategoricalFeature):
                inner_offsets, inner_values = _list_parts(arr, name)
                features.multi[f.name] = (_tensor(inner_values, name).long(), inner_offsets)
            else:
                features.categorical[f.name] = _tensor(arr, name).long()  # stored int32: widened once
        return cls(start.astype(np.int64, copy=False), end.astype(np.int64, copy=False),
                   _tensor(_array(flat.column("ts")), f"{origin} {prefix}: ts"), features)

    def gather(self, samples: np.ndarray) -> SequenceBatch:
        """The given samples' sequences, in that order: the concatenated ranges (offsets from
        the lengths, positions from one repeat + arange), then one ``index_select`` per column
        (measured 4x faster than tensor[positions] for batch-sized gathers)."""
        offsets, pos = range_positions(self.start[samples], self.end[samples])
        index = torch.from_numpy(pos)
        out = FeatureTensors(
            categorical={k: torch.index_select(v, 0, index) for k, v in self.features.categorical.items()},
            numeric={k: torch.index_select(v, 0, index) for k, v in self.features.numeric.items()},
        )
        for k, (values, inner) in self.features.multi.items():
            inner_np = inner.numpy()
            inner_offsets, value_pos = range_positions(inner_np[pos], inner_np[pos + 1])
            out.multi[k] = (torch.index_select(values, 0, torch.from_numpy(value_pos)), torch.from_numpy(inner_offsets))
        return SequenceBatch(torch.from_numpy(offsets), torch.index_select(self.ts, 0, index), out)


def _cat_features(parts: list[FeatureTensors]) -> FeatureTensors:
    """Row-wise concatenation (multi offsets shifted by the values before them)."""
    out = FeatureTensors(
        categorical={k: torch.cat([p.categorical[k] for p in parts]) for k in parts[0].categorical},
        numeric={k: torch.cat([p.numeric[k] for p in parts]) for k in parts[0].numeric},
    )
    for k in parts[0].multi:
        values = [p.multi[k][0] for p in parts]
        out.multi[k] = (torch.cat(values), _cat_offsets([p.multi[k][1] for p in parts]))
    return out


def _cat_offsets(parts: list[torch.Tensor]) -> torch.Tensor:
    """Offsets of concatenated jagged parts: each part's offsets shifted by the rows before it."""
    shifted, base = [parts[0]], int(parts[0][-1])
    for off in parts[1:]:
        shifted.append(off[1:] + base)
        base += int(off[-1])
    return torch.cat(shifted)


def _cat_sequences(parts: list[SequenceBatch]) -> SequenceBatch:
    if len(parts) == 1:
        return parts[0]
    return SequenceBatch(_cat_offsets([p.offsets for p in parts]), torch.cat([p.timestamps for p in parts]),
                         _cat_features([p.features for p in parts]))


class LoadedShard:
    """One shard in memory, ready to cut into batches (see the module docstring).

    ``origin`` names the shard in errors. The shard's sample table must hold the columns of
    ``schema`` (:func:`mtfm.data.store.sample_columns`), its sequence tables every sequence
    type of ``schema``.
    """

    def __init__(self, shard: ShardTables, schema: DataSchema, origin: str) -> None:
        self.schema, self.origin, self.samples = schema, origin, shard.samples
        self.sequences = {
            prefix: _FlatSequence.from_tables(shard.samples, shard.sequences[prefix], prefix, spec, origin)
            for prefix, spec in sequence_types(schema)
        }

    @property
    def num_samples(self) -> int:
        return self.samples.num_rows

    def _rows(self, idx: np.ndarray) -> pa.Table:
        contiguous = idx.size > 0 and int(idx[-1]) - int(idx[0]) + 1 == idx.size and bool(np.all(np.diff(idx) == 1))
        return self.samples.slice(int(idx[0]), idx.size) if contiguous else self.samples.take(pa.array(idx))

    def batch(self, idx: np.ndarray) -> JaggedBatch:
        """The shard's samples ``idx`` (in that order) as one JaggedBatch."""
        return batch_of([(self, idx)], self.schema)


def _with_expiry(seq: SequenceBatch, max_len: int) -> SequenceBatch:
    """A real-time sequence with each action's expiry (its ``max_len``-th successor's time):
    each query then sees only the ``max_len`` most recent actions before it (mtfm.model.mask)."""
    return dataclasses.replace(seq, expiry=realtime_expiry(seq.offsets, seq.timestamps, max_len))


def batch_of(pieces: list[tuple[LoadedShard, np.ndarray]], schema: DataSchema) -> JaggedBatch:
    """Samples picked from one or more loaded shards (in the order given) as one JaggedBatch.

    ``schema`` decides which scenarios and sequences are read; dict orders follow the schema,
    so token group ids follow ``schema.token_groups()``.
    """
    tables = [shard._rows(idx) for shard, idx in pieces]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    seqs = {}
    for prefix, _ in sequence_types(schema):
        parts = [shard.sequences[prefix].gather(idx) for shard, idx in pieces]
        seqs[prefix] = _cat_sequences(parts)
    history = {h.name: seqs[f"H.{h.name}"] for h in schema.history}
    realtime = {r.name: _with_expiry(seqs[f"R.{r.name}"], r.max_len) for r in schema.realtime}
    scenarios = {s.name: _scenario(table, schema, s.name) for s in schema.scenarios}
    return JaggedBatch(
        user_ids=_tensor(_array(table.column("user_id")), "user_id"),
        window_start=_tensor(_array(table.column("window_start")), "window_start"),
        history=history,
        realtime=realtime,
        scenarios=scenarios,
        layout=build_token_layout(history, realtime, scenarios, table.num_rows),
    )


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class _End:
    pass


@dataclass
class _Failure:
    error: BaseException


class BatchLoader:
    """Batches of whole samples from one split of a prepared directory (see module docstring)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, *, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2, scenarios: list[str] | None = None,
                 drop_inputs: Sequence[str] = (), drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest: Manifest = read_manifest(self.data_dir)
        if split not in self.manifest.splits:
            raise UnknownNameError(f"unknown split {split!r}; {self.data_dir} has {sorted(self.manifest.splits)}")
        full = self.manifest.schema_obj
        try:
            self.schema: DataSchema = full if scenarios is None else full.restrict(list(scenarios))
            self.schema = self.schema.without(drop_inputs)
        except SchemaError as err:
            raise UnknownNameError(f"{self.data_dir}: {err}") from None
        shards = self.manifest.splits[split].shards
        if len(shards) < world_size:
            raise ValueError(
                f"{self.data_dir}/{split}: {len(shards)} shard(s) for {world_size} ranks; every rank needs one "
                f"(re-run `mtfm prepare --shards {world_size}` or more)"
            )
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rank, self.world_size, self.prefetch, self.drop_last = rank, world_size, prefetch, drop_last
        self.shards = shards[rank::world_size]
        # How errors name each of this rank's shards: "DIR/manifest.json: splits.train.shards[3]".
        self._fields = [f"{self.data_dir / MANIFEST_NAME}: {shard_field(split, i)}"
                        for i in range(rank, len(shards), world_size)]
        for shard, where in zip(self.shards, self._fields):
            check_shard_files(self.data_dir, shard, where)  # before any work: a stat + a footer per file
        self.columns = sample_columns(self.schema)
        self._filtered = scenarios is not None and len(self.schema.scenarios) < len(full.scenarios)
        self._keep = [self._kept_samples(s.path, s.samples) for s in self.shards]
        self.skipped_samples = sum(s.samples for s in self.shards) - sum(k.size for k in self._keep)

    def _kept_samples(self, rel: str, samples: int) -> np.ndarray:
        """Indices of the shard's samples with at least one exposure of the kept scenarios."""
        if not self._filtered:
            return np.arange(samples, dtype=np.int64)
        cols = [f"{scenario_prefix(s)}.ts" for s in self.schema.scenario_names]
        table = pq.read_table(self.data_dir / rel, columns=cols)
        counts = np.zeros(table.num_rows, dtype=np.int64)
        for c in cols:
            offsets = _array(table.column(c)).offsets.to_numpy()
            counts += np.diff(offsets)
        return np.flatnonzero(counts > 0).astype(np.int64)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return int(sum(k.size for k in self._keep))

    def num_batches(self, epoch: int = 0) -> int:
        """Batches of ``iterate(epoch)`` (the same for every epoch; the argument keeps call sites explicit)."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(shard position, sample indices in visiting order) for the epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        plan = []
        for pos in order:
            keep = self._keep[pos]
            plan.append((int(pos), keep[rng.permutation(keep.size)] if self.shuffle else keep))
        return plan

    def _read(self, pos: int) -> LoadedShard:
        """Shard ``pos``, its bytes checked against the manifest (size, checksum, rows) as read."""
        path = self.data_dir / self.shards[pos].path
        tables = read_shard(path, self.schema, self.columns, expect=self.shards[pos], where=self._fields[pos])
        return LoadedShard(tables, self.schema, str(path))

    def _batches(self, epoch: int, start_batch: int) -> Iterator[JaggedBatch]:
        skip = start_batch * self.batch_size
        pieces: list[tuple[LoadedShard, np.ndarray]] = []
        need = self.batch_size
        for pos, idx in self._plan(epoch):
            if skip >= idx.size:
                skip -= idx.size
                continue
            idx, skip = idx[skip:], 0
            table = self._read(pos)
            while idx.size:
                take, idx = idx[:need], idx[need:]
                pieces.append((table, take))
                need -= take.size
                if need == 0:
                    yield batch_of(pieces, self.schema)
                    pieces, need = [], self.batch_size
        if pieces and not self.drop_last:
            yield batch_of(pieces, self.schema)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[JaggedBatch]:
        """Batches of the epoch from ``start_batch`` on, prepared by a background thread."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if self.prefetch <= 0:
            yield from self._batches(epoch, start_batch)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self._batches(epoch, start_batch):
                    if not put(batch):
                        return
                put(_End())
            except BaseException as err:  # handed to the consumer, re-raised there
                put(_Failure(err))

        worker = threading.Thread(target=work, name=f"mtfm-loader-{self.split}-r{self.rank}", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, _End):
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            worker.join()

    def __iter__(self) -> Iterator[JaggedBatch]:
        return self.iterate(0)

    def __len__(self) -> int:
        return self.num_batches(0)
