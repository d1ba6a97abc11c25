"""Operations that derive a new :class:`~mtfm.data.batch.JaggedBatch` from another one.

Used to feed a scenario subgraph from a multi-scenario batch (:func:`restrict_batch`), to
score a subset of users (:func:`select_users`, e.g. micro-batched inference), and to reorder
a scenario's exposures (:func:`reorder_scenario_rows`). Each result gets a fresh
``TokenLayout`` from :func:`~mtfm.data.batch.build_token_layout`, so it is exactly what the
loader would have produced for that content.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtfm.data.batch import (
    JaggedBatch,
    SequenceBatch,
    build_token_layout,
    ranges_to_rows,
    take_feature_rows,
    take_scenario_rows,
)


def _user_rows(offsets: Tensor, users: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``users`` (in that order) and the new offsets."""
    new_offsets, rows = ranges_to_rows(offsets[:-1][users], offsets[1:][users])
    return rows, new_offsets


def _take_sequence(seq: SequenceBatch, rows: Tensor, offsets: Tensor) -> SequenceBatch:
    expiry = seq.expiry[rows] if seq.expiry is not None else None  # whole users are taken: still valid
    return SequenceBatch(offsets, seq.timestamps[rows], take_feature_rows(seq.features, rows), expiry)


def _rebuild(batch: JaggedBatch, history, realtime, scenarios, user_ids: Tensor, window_start: Tensor) -> JaggedBatch:
    layout = build_token_layout(history, realtime, scenarios, int(user_ids.shape[0]))
    return JaggedBatch(user_ids, window_start, history, realtime, scenarios, layout)


def restrict_batch(batch: JaggedBatch, scenario_names: list[str]) -> JaggedBatch:
    """The same users with only the named scenarios' exposures (e.g. the input of a subgraph)."""
    unknown = [n for n in scenario_names if n not in batch.scenarios]
    if unknown:
        raise KeyError(f"the batch has no scenario(s) {unknown}; it has {list(batch.scenarios)}")
    scenarios = {n: s for n, s in batch.scenarios.items() if n in scenario_names}
    return _rebuild(batch, dict(batch.history), dict(batch.realtime), scenarios, batch.user_ids, batch.window_start)


def select_users(batch: JaggedBatch, users: list[int] | Tensor) -> JaggedBatch:
    """A batch of the given users (positions in ``batch``), in the given order."""
    idx = torch.as_tensor(users, dtype=torch.long, device=batch.user_ids.device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= batch.batch_size):
        raise IndexError(f"user positions must lie in [0, {batch.batch_size}), got {idx.tolist()}")

    def seq(s: SequenceBatch) -> SequenceBatch:
        return _take_sequence(s, *_user_rows(s.offsets, idx))

    history = {n: seq(s) for n, s in batch.history.items()}
    realtime = {n: seq(s) for n, s in batch.realtime.items()}
    scenarios = {n: take_scenario_rows(s, *_user_rows(s.offsets, idx)) for n, s in batch.scenarios.items()}
    return _rebuild(batch, history, realtime, scenarios, batch.user_ids[idx], batch.window_start[idx])


def reorder_scenario_rows(batch: JaggedBatch, name: str, order: Tensor) -> JaggedBatch:
    """Scenario ``name``'s rows taken in ``order`` (a permutation that keeps every row with its user)."""
    sc = batch.scenarios[name]
    order = torch.as_tensor(order, dtype=torch.long)
    user_of_row = torch.repeat_interleave(torch.arange(batch.batch_size), sc.offsets[1:] - sc.offsets[:-1])
    if sorted(order.tolist()) != list(range(sc.num_rows)) or not torch.equal(user_of_row[order], user_of_row):
        raise ValueError(f"scenario {name!r}: order must permute rows within each user")
    scenarios = dict(batch.scenarios)
    scenarios[name] = take_scenario_rows(sc, order, sc.offsets)
    return _rebuild(batch, dict(batch.history), dict(batch.realtime), scenarios, batch.user_ids, batch.window_start)


def take_candidates(batch: JaggedBatch, name: str, rows: Tensor) -> JaggedBatch:
    """A one-user batch holding only scenario ``name``'s exposures ``rows`` (in that order), with
    the user's sequences: a request over a subset of its candidates (the naive micro-batch)."""
    if batch.batch_size != 1:
        raise ValueError(f"take_candidates needs a one-user batch, got {batch.batch_size} users")
    sc = batch.scenarios[name]
    rows = torch.as_tensor(rows, dtype=torch.long, device=sc.offsets.device)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= sc.num_rows):
        raise IndexError(f"scenario {name!r}: rows must lie in [0, {sc.num_rows}), got {rows.tolist()}")
    offsets = torch.tensor([0, rows.numel()], dtype=torch.long, device=sc.offsets.device)
    scenarios = {name: take_scenario_rows(sc, rows, offsets)}
    return _rebuild(batch, dict(batch.history), dict(batch.realtime), scenarios, batch.user_ids, batch.window_start)
