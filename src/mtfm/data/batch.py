"""JaggedBatch: the one object passed from the data layer to the model.

Every variable-length field is stored as flat ``values`` plus per-user ``offsets`` (length
``B + 1``): user ``b`` owns rows ``offsets[b]:offsets[b + 1]``. Nothing is padded, and no
scenario's columns appear in another scenario's table (alignment-free, paper section 3.1).

Layout of one batch of ``B`` aggregated samples (one user, one time window each):

* ``history[name]``, ``realtime[name]``: one :class:`SequenceBatch` per sequence type
  (H and R), rows in ascending timestamp order within a user;
* ``scenarios[name]``: one :class:`ScenarioBatch` per scenario with that scenario's own
  user / cross / item features, labels ``[n, tasks]`` with a per-task mask, and oracle
  probabilities (NaN when unknown); rows in ascending timestamp order within a user;
* ``layout``: the token sequence the model will build, ``(H; R; T)`` per user (eq. 5), with a
  Group LayerNorm group id, a token type and the timestamp of every token, and where each
  token's features live (group + row). It is computed on the CPU by the loader so the model
  never re-derives it.

Group ids follow :meth:`mtfm.config.DataSchema.token_groups`: history types, then real-time
types, then scenarios, in schema order. The dict order of ``history``, ``realtime`` and
``scenarios`` is that same order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

TOKEN_H, TOKEN_R, TOKEN_T = 0, 1, 2
NEVER = (1 << 63) - 1  # expiry of a token that never leaves any query's view (int64 max)

_T = TypeVar("_T")


def _map_tensors(obj: _T, fn) -> _T:
    """Apply ``fn`` to every tensor inside nested dataclasses / dicts / tuples."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class FeatureTensors:
    """Encoded features of one jagged field (``n`` rows).

    ``categorical``: long ``[n]`` ids; ``numeric``: float32 ``[n]`` normalised values;
    ``multi``: for list-valued features, ``(values long [m], offsets long [n + 1])``.
    Keys are the feature names of the schema, in schema order.
    """

    categorical: dict[str, Tensor] = field(default_factory=dict)
    numeric: dict[str, Tensor] = field(default_factory=dict)
    multi: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class SequenceBatch:
    """One behaviour sequence type (H or R) for the ``B`` users of a batch.

    ``expiry`` (real-time types): per row, the latest query timestamp for which the action is
    still among the ``max_len`` most recent ones of its type strictly before the query (see
    :func:`realtime_expiry` and :mod:`mtfm.model.mask`); None for history types (never read)
    and means "never expires".
    """

    offsets: Tensor  # long [B + 1]
    timestamps: Tensor  # long [n]
    features: FeatureTensors
    expiry: Tensor | None = None  # long [n], real-time types only

    @property
    def num_rows(self) -> int:
        return self.timestamps.shape[0]  # not int(): a symbolic size under torch.export stays symbolic


@dataclass
class ScenarioBatch:
    """The exposures of one scenario for the ``B`` users of a batch (one row = one T-token)."""

    offsets: Tensor  # long [B + 1]
    timestamps: Tensor  # long [n]
    user: FeatureTensors
    cross: FeatureTensors
    item: FeatureTensors
    labels: Tensor  # float32 [n, num_tasks], 0/1
    label_mask: Tensor  # bool [n, num_tasks]; False = label not observed
    oracle: Tensor  # float32 [n, num_tasks]; true probability, NaN when unknown
    source_row: Tensor | None = None  # long [n]: row in the scenario's source table (None: not known)

    @property
    def num_rows(self) -> int:
        return self.timestamps.shape[0]  # not int(): a symbolic size under torch.export stays symbolic


@dataclass
class TokenLayout:
    """The ``(H; R; T)`` token sequence of every user, flattened over the batch.

    ``offsets`` [B + 1] delimit each user's tokens. Per token: ``group_ids`` (index into
    ``DataSchema.token_groups()``), ``token_type`` (TOKEN_H / TOKEN_R / TOKEN_T),
    ``timestamps``, ``source_row``: the row inside that group's flat tensors
    (``history[...]``, ``realtime[...]`` or ``scenarios[...]``) that the token comes from, and
    ``expiry``: for R-tokens the end of their visibility (:func:`realtime_expiry`), ``NEVER``
    for the others.
    """

    offsets: Tensor  # long [B + 1]
    group_ids: Tensor  # long [N]
    token_type: Tensor  # long [N]
    timestamps: Tensor  # long [N]
    source_row: Tensor  # long [N]
    expiry: Tensor | None = None  # long [N]; None: every token NEVER expires

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class JaggedBatch:
    user_ids: Tensor  # long [B]
    window_start: Tensor  # long [B]
    history: dict[str, SequenceBatch]
    realtime: dict[str, SequenceBatch]
    scenarios: dict[str, ScenarioBatch]
    layout: TokenLayout

    @property
    def batch_size(self) -> int:
        return self.user_ids.shape[0]  # not int(): a symbolic size under torch.export stays symbolic

    @property
    def num_exposures(self) -> int:
        return sum(s.num_rows for s in self.scenarios.values())

    @property
    def num_tokens(self) -> int:
        return self.layout.group_ids.shape[0]  # not int(): a symbolic size under torch.export stays symbolic

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JaggedBatch":
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "JaggedBatch":
        return _map_tensors(self, lambda t: t.pin_memory())


def realtime_expiry(offsets: Tensor, timestamps: Tensor, max_len: int) -> Tensor:
    """Per real-time action: the timestamp of the ``max_len``-th later action of the same user
    and type (``NEVER`` when there is none), for rows in time order within each user.

    A query at ``t`` sees action ``i`` iff ``t_i < t <= expiry_i``: exactly when ``i`` is among
    the ``max_len`` most recent actions strictly before ``t`` (:mod:`mtfm.model.mask`). Only the
    rows of the batch are used: an action whose ``max_len``-th successor lies beyond the
    sample's stored rows (after its window) never expires for the sample's queries.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    n = timestamps.shape[0]
    idx = torch.arange(n, device=timestamps.device)
    end = torch.repeat_interleave(offsets[1:], offsets[1:] - offsets[:-1])  # each row's user end
    ahead = idx + max_len
    has = ahead < end
    later = timestamps.index_select(0, torch.where(has, ahead, idx))
    return torch.where(has, later.long(), torch.full_like(later, NEVER, dtype=torch.long))


def _row_users(offsets: Tensor) -> Tensor:
    """User index of every row, from offsets [B + 1]."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.long), counts)


def build_token_layout(
    history: dict[str, SequenceBatch],
    realtime: dict[str, SequenceBatch],
    scenarios: dict[str, ScenarioBatch],
    batch_size: int,
) -> TokenLayout:
    """Order every user's tokens as (H; R; T) (paper eq. 5).

    H: all history types merged chronologically (ties: schema order of the type).
    R: all real-time types merged chronologically. T: grouped by scenario in schema order,
    each scenario's exposures in their stored (chronological) order.
    Vectorised: two stable sorts over the whole batch, no Python loop over users.
    """
    parts = [(TOKEN_H, s) for s in history.values()] + [(TOKEN_R, s) for s in realtime.values()]
    parts += [(TOKEN_T, s) for s in scenarios.values()]
    if not parts:
        raise ValueError("a batch needs at least one scenario")
    users, types, groups, stamps, rows, expiries = [], [], [], [], [], []
    for group_id, (token_type, part) in enumerate(parts):
        n = part.num_rows
        users.append(_row_users(part.offsets))
        types.append(torch.full((n,), token_type, dtype=torch.long))
        groups.append(torch.full((n,), group_id, dtype=torch.long))
        stamps.append(part.timestamps.long())
        rows.append(torch.arange(n, dtype=torch.long))
        expiry = getattr(part, "expiry", None) if token_type == TOKEN_R else None
        expiries.append(expiry.long() if expiry is not None else torch.full((n,), NEVER, dtype=torch.long))
    user, token_type, group_ids = torch.cat(users), torch.cat(types), torch.cat(groups)
    timestamps, source_row, expiry_all = torch.cat(stamps), torch.cat(rows), torch.cat(expiries)

    # Secondary key: time for H and R; for T keep concatenation order (scenario, stored row).
    secondary = torch.where(token_type == TOKEN_T, torch.zeros_like(timestamps), timestamps)
    order = torch.sort(secondary, stable=True).indices
    primary = (user * 3 + token_type)[order]
    order = order[torch.sort(primary, stable=True).indices]

    counts = torch.bincount(user, minlength=batch_size)
    offsets = torch.zeros(batch_size + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    return TokenLayout(
        offsets=offsets,
        group_ids=group_ids[order],
        token_type=token_type[order],
        timestamps=timestamps[order],
        source_row=source_row[order],
        expiry=expiry_all[order],
    )


# ---- taking rows (used to derive batches: mtfm.model.batch_ops, mtfm.data.per_exposure) ----


def ranges_to_rows(start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """``(offsets [k + 1], row positions)`` of the concatenated ranges ``[start_i, end_i)``."""
    lengths = end - start
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.long, device=start.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    within = torch.arange(int(offsets[-1]), device=start.device) - torch.repeat_interleave(offsets[:-1], lengths)
    return offsets, torch.repeat_interleave(start, lengths) + within


def take_feature_rows(features: FeatureTensors, rows: Tensor) -> FeatureTensors:
    """The given rows (in that order, repeats allowed) of every feature, list-valued ones included."""
    multi: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (values, offsets) in features.multi.items():
        new_offsets, positions = ranges_to_rows(offsets[:-1][rows], offsets[1:][rows])
        multi[name] = (values[positions], new_offsets)
    return FeatureTensors(
        categorical={k: v[rows] for k, v in features.categorical.items()},
        numeric={k: v[rows] for k, v in features.numeric.items()},
        multi=multi,
    )


def take_scenario_rows(sc: ScenarioBatch, rows: Tensor, offsets: Tensor) -> ScenarioBatch:
    """The scenario's exposures ``rows`` (in that order), grouped into samples by ``offsets``."""
    return ScenarioBatch(
        offsets=offsets,
        timestamps=sc.timestamps[rows],
        user=take_feature_rows(sc.user, rows),
        cross=take_feature_rows(sc.cross, rows),
        item=take_feature_rows(sc.item, rows),
        labels=sc.labels[rows],
        label_mask=sc.label_mask[rows],
        oracle=sc.oracle[rows],
        source_row=sc.source_row[rows] if sc.source_row is not None else None,
    )
