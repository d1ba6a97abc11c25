"""One sample per exposure: the conventional layout that user-level aggregation replaces.

MTFM (paper section 3.1 / 3.3.1, after MTGR) stores and trains on *aggregated* samples: one
user and one time window, the user's history (H) and real-time (R) sequences once, and every
exposure of the window as a T-token. A conventional pipeline stores one sample per exposure,
each repeating its user's sequences. :func:`per_exposure_batch` turns an aggregated
:class:`~mtfm.data.batch.JaggedBatch` into that form, so the two can be compared on the same
model, weights and exposures (``benchmarks/bench_aggregation.py``).

Which sequence rows does an exposure's own sample hold? The dynamic mask
(:mod:`mtfm.model.mask`) lets a T-token at ``t_q`` see every H-token, the R-tokens with
``t_k < t_q <= expiry_k`` and itself; it never lets any token see a T-token. A T-token's
logits therefore depend on the H- and R-tokens *as the stack has transformed them*, and in a
full-attention layer an R-token attends to its own earlier R view, which reaches further back
than the exposure's view (and further with every full layer). Three choices
(``realtime=``):

* ``"window"``: the user's whole H and R of the window, with the same expiries. The context
  tokens are the same tokens under the same mask, so every T-token gets the same logits as in
  the aggregated batch (up to float summation order).
* ``"past"`` (default): H and the R actions strictly before the exposure. Also exact: an
  action at or after ``t_q`` is visible only to queries later than itself, and every query
  the exposure depends on is earlier (R) or before the window (H, ``ts < window start``), so
  dropping it changes no visible set; the kept rows keep their expiries (recomputing them from
  the kept rows changes no visibility either: an expiry at or after ``t_q`` and "never" admit
  the same queries ``<= t_q``). This is what a conventional pipeline that must reproduce the
  aggregated model would store, and the fairer (smaller) per-exposure baseline.
* ``"view"``: H and only the R actions the exposure itself sees (its ``max_len`` most recent
  before ``t_q``), what a request-shaped store would hold. *Not* equal to the aggregated
  model: the oldest of those R-tokens lose the earlier actions they attend to in the full
  layers. It bounds the storage of a conventional store from below.

Every exposure appears exactly once; samples are ordered by (user, token order of the
aggregated batch: scenario, then stored row), so each scenario's rows keep their order and the
model's ``logits[s]`` line up row by row with the aggregated batch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mtfm.config import DataSchema

from mtfm.data.batch import (
    TOKEN_T,
    FeatureTensors,
    JaggedBatch,
    ScenarioBatch,
    SequenceBatch,
    build_token_layout,
    ranges_to_rows,
    take_feature_rows,
    take_scenario_rows,
)
from mtfm.data.store import (
    ShardTables,
    bound_columns,
    label_column,
    oracle_column,
    history_prefix,
    realtime_prefix,
    sample_columns,
    scenario_feature_columns,
    scenario_prefix,
    sequence_columns,
    sequence_path,
    sequence_types,
    source_row_column,
)

RealtimeView = Literal["window", "past", "view"]
REALTIME_VIEWS: tuple[str, ...] = ("window", "past", "view")


def _row_users(offsets: Tensor) -> Tensor:
    """User index of every row of a jagged field."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.long), counts)


def _first_at_or_after(offsets: Tensor, values: Tensor, users: Tensor, bound: Tensor) -> Tensor:
    """Per query ``i``: the first row of user ``users[i]`` with ``values >= bound[i]`` (the user's
    end when none), for ``values`` ascending within each user. One ``searchsorted`` over
    (user, dense rank of the value) keys, so no loop over users and no int64 overflow."""
    ranks = torch.unique(torch.cat([values, bound]), return_inverse=True)[1]
    span = int(ranks.max()) + 2 if ranks.numel() else 1
    row_key = _row_users(offsets) * span + ranks[: values.shape[0]]
    query_key = users * span + ranks[values.shape[0]:]
    return torch.searchsorted(row_key, query_key)


def _exposure_sequence(seq: SequenceBatch, users: Tensor, times: Tensor, cut: RealtimeView) -> SequenceBatch:
    """The rows of each exposure's user (``cut`` picks which, see the module docstring), one
    sample per exposure, expiries carried over."""
    start, end = seq.offsets[:-1][users], seq.offsets[1:][users]
    if cut in ("past", "view"):
        end = _first_at_or_after(seq.offsets, seq.timestamps, users, times)
    if cut == "view":
        if seq.expiry is None:
            raise ValueError("realtime='view' needs each real-time row's expiry (the loader sets it)")
        # expiry is non-decreasing within a user (the max_len-th successor's time): a range.
        start = torch.minimum(_first_at_or_after(seq.offsets, seq.expiry, users, times), end)
    offsets, rows = ranges_to_rows(start, end)
    expiry = seq.expiry[rows] if seq.expiry is not None else None
    return SequenceBatch(offsets, seq.timestamps[rows], take_feature_rows(seq.features, rows), expiry)


def _exposure_scenario(sc: ScenarioBatch, is_mine: Tensor, rows: Tensor) -> ScenarioBatch:
    """The scenario's rows ``rows`` (in order), one per sample flagged in ``is_mine``."""
    offsets = torch.zeros(is_mine.shape[0] + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(is_mine.long(), 0)
    return take_scenario_rows(sc, rows, offsets)


def per_exposure_batch(batch: JaggedBatch, realtime: RealtimeView = "past") -> JaggedBatch:
    """The same exposures as ``batch``, one sample each, every sample with a copy of its
    user's H sequences and of the R rows ``realtime`` selects (module docstring).

    Sample ``i`` is the ``i``-th T-token of ``batch.layout`` (users in order, within a user
    scenarios in schema order, then stored rows), so ``batch.scenarios[s]`` rows keep their
    order. ``user_ids`` and ``window_start`` are repeated per sample. CPU tensors.
    """
    if realtime not in REALTIME_VIEWS:
        raise ValueError(f"realtime must be one of {REALTIME_VIEWS}, got {realtime!r}")
    layout = batch.layout
    t_tokens = torch.nonzero(layout.token_type == TOKEN_T).flatten()
    users = _row_users(layout.offsets)[t_tokens]
    first_scenario_group = len(batch.history) + len(batch.realtime)
    scenario_of = layout.group_ids[t_tokens] - first_scenario_group
    rows = layout.source_row[t_tokens]
    times = layout.timestamps[t_tokens]

    history = {n: _exposure_sequence(s, users, times, "window") for n, s in batch.history.items()}
    realtime_seqs = {n: _exposure_sequence(s, users, times, realtime) for n, s in batch.realtime.items()}
    scenarios = {}
    for k, (name, sc) in enumerate(batch.scenarios.items()):
        mine = scenario_of == k
        scenarios[name] = _exposure_scenario(sc, mine, rows[mine])
    n = int(t_tokens.shape[0])
    return JaggedBatch(
        user_ids=batch.user_ids[users],
        window_start=batch.window_start[users],
        history=history,
        realtime=realtime_seqs,
        scenarios=scenarios,
        layout=build_token_layout(history, realtime_seqs, scenarios, n),
    )


def exposure_users(batch: JaggedBatch) -> Tensor:
    """Per sample of a per-exposure batch built from ``batch``: the aggregated sample it came
    from (the position in ``batch``), in :func:`per_exposure_batch` order."""
    t_tokens = torch.nonzero(batch.layout.token_type == TOKEN_T).flatten()
    return _row_users(batch.layout.offsets)[t_tokens]


# --------------------------------------------------------------------------------------------
# Storage: a batch written in the store's encoding, each sample with its own sequence rows
# --------------------------------------------------------------------------------------------


StoredTypes = tuple[pa.Schema, dict[str, pa.Schema]]  # sample file, sequence files by prefix


def stored_types(shard_path: str | Path, schema: DataSchema) -> StoredTypes:
    """The Arrow types a prepared shard stores (its sample file, then each sequence file by
    prefix): :func:`shard_tables` writes with exactly these, so sizes compare like for like."""
    seq = {prefix: pq.read_schema(sequence_path(shard_path, prefix)) for prefix, _ in sequence_types(schema)}
    return pq.read_schema(shard_path), seq


def _to_arrow(values: Tensor, typ: pa.DataType) -> pa.Array:
    """A flat tensor as an Arrow array of the stored type (ids narrowed back to int32 when
    stored so; the cast is checked, so an id that does not fit is an error)."""
    return pa.array(values.detach().cpu().numpy()).cast(typ)


def _list(offsets: Tensor, values: pa.Array) -> pa.Array:
    return pa.LargeListArray.from_arrays(pa.array(offsets.cpu().numpy().astype(np.int64)), values)


def _feature_array(features: FeatureTensors, name: str, typ: pa.DataType) -> pa.Array:
    """One feature column (``typ``: its stored type; list-valued ones are ``large_list``)."""
    if name in features.multi:
        values, offsets = features.multi[name]
        return _list(offsets, _to_arrow(values, typ.value_type))
    tensor = features.categorical.get(name, features.numeric.get(name))
    if tensor is None:
        raise KeyError(f"feature {name!r} is not in the batch")
    return _to_arrow(tensor, typ)


def _scenario_arrays(sc: ScenarioBatch, name: str, schema: DataSchema, types: pa.Schema) -> dict[str, pa.Array]:
    """The sample file's columns of scenario ``name`` (lists: one per sample of the batch)."""
    spec = schema.scenario(name)
    if sc.source_row is None:
        raise ValueError(f"scenario {name!r}: the batch has no source rows; the store needs them")
    flat = {f"{scenario_prefix(name)}.ts": sc.timestamps, source_row_column(name): sc.source_row}
    out: dict[str, pa.Array] = {}
    for group, pairs in scenario_feature_columns(spec).items():
        for feature, col in pairs:
            out[col] = _feature_array(getattr(sc, group), feature, types.field(col).type.value_type)
    for k, task in enumerate(spec.tasks):
        flat[label_column(name, task.name)] = torch.where(sc.label_mask[:, k], sc.labels[:, k], -1.0)
        if task.oracle_column is not None:
            flat[oracle_column(name, task.name)] = sc.oracle[:, k]
    for col, tensor in flat.items():
        out[col] = _to_arrow(tensor, types.field(col).type.value_type)
    return {col: _list(sc.offsets, arr) for col, arr in out.items()}


def _sequence_table(seq: SequenceBatch, spec_columns: list[str], types: pa.Schema) -> pa.Table:
    arrays = [_to_arrow(seq.timestamps, types.field("ts").type)]
    arrays += [_feature_array(seq.features, c, types.field(c).type) for c in spec_columns[1:]]
    return pa.Table.from_arrays(arrays, schema=types)


def shard_tables(batch: JaggedBatch, schema: DataSchema, types: StoredTypes) -> ShardTables:
    """``batch`` as one shard of the store's format and encoding (``types``:
    :func:`stored_types`), every sample pointing at *its own* run of sequence rows.

    That is how a store without user-level sharing lays out sequences: the prepared store
    writes each action once per shard and lets a user's windows share ranges, so writing an
    aggregated batch here gives the "one copy per sample" size and a per-exposure batch the
    conventional one. The result reads back with :class:`mtfm.data.loader.LoadedShard`.
    """
    sample_types, seq_types = types
    columns: dict[str, pa.Array] = {
        "user_id": _to_arrow(batch.user_ids, sample_types.field("user_id").type),
        "window_start": _to_arrow(batch.window_start, sample_types.field("window_start").type),
    }
    sequences: dict[str, pa.Table] = {}
    seqs = {**{history_prefix(n): s for n, s in batch.history.items()},
            **{realtime_prefix(n): s for n, s in batch.realtime.items()}}
    for prefix, spec in sequence_types(schema):
        seq = seqs[prefix]
        lo, hi = bound_columns(prefix)
        columns[lo], columns[hi] = _to_arrow(seq.offsets[:-1], pa.int64()), _to_arrow(seq.offsets[1:], pa.int64())
        sequences[prefix] = _sequence_table(seq, sequence_columns(spec), seq_types[prefix])
    for name, sc in batch.scenarios.items():
        columns.update(_scenario_arrays(sc, name, schema, sample_types))
    names = sample_columns(schema)
    fields = pa.schema([sample_types.field(c) for c in names])
    samples = pa.Table.from_arrays([columns[c] for c in names], schema=fields)
    return ShardTables(samples, sequences)


__all__ = ["REALTIME_VIEWS", "RealtimeView", "exposure_users", "per_exposure_batch", "shard_tables", "stored_types"]
