"""How query and key tokens are grouped into the rows and columns of a heatmap.

Rows are always the model's scenarios (a T-token's scenario). Columns depend on the *view*:

* ``source``: H-tokens by the scenario their action came from (the behaviour tables' source
  feature, ``scenario`` in the synthetic world: 0 = organic search, k = the k-th feed), then one
  column per real-time (R) type, then ``self`` (the T-token's own key, the only T key it sees);
* ``sequence``: H-tokens by history type, R-tokens by real-time type, ``self``;
* ``age_history`` / ``age_realtime``: H (R) tokens by the age of the action at the query's
  time, ``t_query - t_key``, in roughly log-spaced buckets (:data:`AGE_EDGES_S`);
* ``match_<feature>``: H and R tokens whose ``feature`` equals the T-token's item feature
  (``cuisine`` in the synthetic world, where a same-cuisine click is the planted real-time
  effect) against those where it differs. Only when the scenario and the sequences encode the
  feature identically (one spec, so equal ids mean equal values);
* ``match_<feature>_realtime_age``: R-tokens by same / other ``feature`` and age together, the
  shape of the synthetic world's planted real-time effect (a same-cuisine click in the last
  ``realtime_window_s`` seconds raises the click probability; older or other-cuisine ones do not).

The mask decides which pairs exist; a view only sorts the visible ones. Grouping reads the raw
ids of the batch (:class:`TokenTable`), never the model's embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.config import CategoricalFeature, DataSchema
from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T, JaggedBatch

MINUTE, HOUR, DAY = 60, 3600, 86_400
# Edges of the age buckets; 30 min is the synthetic world's default real-time window (realtime_window_s).
AGE_EDGES_S: tuple[int, ...] = (10 * MINUTE, 30 * MINUTE, 2 * HOUR, 6 * HOUR, DAY, 3 * DAY, 7 * DAY, 21 * DAY)
AGE_LABELS: tuple[str, ...] = ("<10m", "10-30m", "30m-2h", "2-6h", "6h-1d", "1-3d", "3-7d", "7-21d", ">=21d")


def age_bucket(age_s: Tensor) -> Tensor:
    """Bucket of each age in seconds: ``i`` with ``AGE_EDGES_S[i-1] <= age < AGE_EDGES_S[i]``."""
    edges = torch.tensor(AGE_EDGES_S, dtype=age_s.dtype, device=age_s.device)
    return torch.bucketize(age_s, edges, right=True)


def _identity_categorical(schema: DataSchema, name: str, sequences: list[str]) -> CategoricalFeature | None:
    """The categorical ``name`` of every named sequence, when all share one identity-id spec (ids = values)."""
    specs = []
    for seq in (*schema.history, *schema.realtime):
        if seq.name in sequences:
            found = [f for f in seq.features if f.name == name]
            specs.append(found[0] if found else None)
    if not specs or any(not isinstance(f, CategoricalFeature) or f.num_embeddings is None for f in specs):
        return None
    first = specs[0].model_dump()
    return specs[0] if all(f.model_dump() == first for f in specs) else None


@dataclass(frozen=True)
class Grouping:
    """The rows and every view's columns for one model schema (fixed before any batch is read)."""

    scenarios: list[str]
    history: list[str]
    realtime: list[str]
    source_feature: str | None  # None: the history types carry no common identity-id source feature
    source_values: list[int]
    source_labels: list[str]
    match_feature: str | None  # None: no common item / sequence feature to compare

    @property
    def views(self) -> dict[str, list[str]]:
        """View name -> column labels."""
        realtime = [f"R:{r}" for r in self.realtime]
        views = {
            "sequence": [f"H:{h}" for h in self.history] + realtime + ["self"],
            "age_history": list(AGE_LABELS),
            "age_realtime": list(AGE_LABELS),
        }
        if self.source_feature is not None:
            views = {"source": [f"H {s}" for s in self.source_labels] + realtime + ["self"], **views}
        if self.match_feature is not None:
            f = self.match_feature
            views[f"match_{f}"] = [f"H same {f}", f"H other {f}", f"R same {f}", f"R other {f}"]
            views[f"match_{f}_realtime_age"] = ([f"R same {a}" for a in AGE_LABELS]
                                               + [f"R other {a}" for a in AGE_LABELS])
        return views


def make_grouping(schema: DataSchema, source_feature: str | None = "scenario",
                  source_names: dict[int, str] | None = None, match_feature: str | None = "cuisine") -> Grouping:
    """The grouping of ``schema``'s tokens.

    ``source_feature``: the history types' feature naming where an action came from (must be an
    identity-id categorical, the same in every history type; else the ``source`` view is left
    out). ``source_names``: labels of its values (default ``"<feature>=<id>"``).
    ``match_feature``: compared between a T-token's item features and each H / R token.
    """
    history = [s.name for s in schema.history]
    realtime = [s.name for s in schema.realtime]
    source = _identity_categorical(schema, source_feature, history) if source_feature and history else None
    values: list[int] = list(range(source.num_embeddings)) if source is not None else []
    names = source_names or {}
    labels = [names.get(v, f"{source_feature}={v}") for v in values]
    match = None
    if match_feature and (history or realtime):
        seq = _identity_categorical(schema, match_feature, history + realtime)
        items = [[f for f in sc.item_features if f.name == match_feature] for sc in schema.scenarios]
        if seq is not None and all(len(f) == 1 and f[0].model_dump() == seq.model_dump() for f in items):
            match = match_feature
    return Grouping(schema.scenario_names, history, realtime, source_feature if source is not None else None,
                    values, labels, match)


@dataclass(frozen=True)
class TokenTable:
    """Per flat token of one batch (``[N]`` each): what the views group by.

    ``row``: a T-token's scenario (index into ``Grouping.scenarios``), else -1; ``sequence``: an H
    or R token's column in the ``sequence`` view, else -1; ``source``: an H-token's column in the
    ``source`` view (R: its R column), else -1; ``match``: the match feature's id (-1: none).
    """

    token_type: Tensor
    timestamps: Tensor
    user: Tensor
    row: Tensor
    sequence: Tensor
    source: Tensor
    match: Tensor


def token_table(batch: JaggedBatch, grouping: Grouping) -> TokenTable:
    """The :class:`TokenTable` of ``batch`` (its groups matched to ``grouping`` by name)."""
    layout = batch.layout
    n = layout.token_type.shape[0]
    minus = torch.full((n,), -1, dtype=torch.long)
    row, sequence, source, match = minus.clone(), minus.clone(), minus.clone(), minus.clone()
    parts = ([("H", name, seq) for name, seq in batch.history.items()]
             + [("R", name, seq) for name, seq in batch.realtime.items()]
             + [("T", name, sc) for name, sc in batch.scenarios.items()])
    n_hist = len(grouping.history)
    value_column = {v: i for i, v in enumerate(grouping.source_values)}
    for gid, (kind, name, part) in enumerate(parts):
        tokens = torch.nonzero(layout.group_ids == gid).flatten()
        rows = layout.source_row[tokens]
        if kind == "T":
            row[tokens] = grouping.scenarios.index(name)
            if grouping.match_feature is not None:
                match[tokens] = part.item.categorical[grouping.match_feature][rows]
            continue
        if kind == "H":
            sequence[tokens] = grouping.history.index(name)
            if grouping.source_feature is not None:
                ids = part.features.categorical[grouping.source_feature][rows].tolist()
                source[tokens] = torch.tensor([value_column.get(int(v), -1) for v in ids], dtype=torch.long)
        else:
            column = n_hist + grouping.realtime.index(name)
            sequence[tokens] = column
            source[tokens] = len(grouping.source_values) + grouping.realtime.index(name)
        if grouping.match_feature is not None:
            match[tokens] = part.features.categorical[grouping.match_feature][rows]
    user = torch.repeat_interleave(torch.arange(layout.offsets.shape[0] - 1), layout.offsets[1:] - layout.offsets[:-1])
    return TokenTable(layout.token_type.cpu(), layout.timestamps.cpu(), user, row, sequence, source, match)


def pair_columns(view: str, grouping: Grouping, table: TokenTable, q: Tensor, k: Tensor) -> Tensor:
    """Column of each visible (T query ``q``, key ``k``) pair in ``view`` (-1: not shown in it)."""
    k_type = table.token_type[k]
    own = q == k
    if view in ("source", "sequence"):
        cols = (table.source if view == "source" else table.sequence)[k]
        self_col = len(grouping.views[view]) - 1
        return torch.where(own, torch.full_like(cols, self_col), cols)
    if view in ("age_history", "age_realtime"):
        kind = TOKEN_H if view == "age_history" else TOKEN_R
        bucket = age_bucket(table.timestamps[q] - table.timestamps[k])
        return torch.where((k_type == kind) & ~own, bucket, torch.full_like(bucket, -1))
    if view == f"match_{grouping.match_feature}":
        known = (table.match[q] >= 0) & (table.match[k] >= 0) & (k_type != TOKEN_T)
        cols = (k_type == TOKEN_R).long() * 2 + (table.match[q] != table.match[k]).long()
        return torch.where(known, cols, torch.full_like(cols, -1))
    if view == f"match_{grouping.match_feature}_realtime_age":
        known = (table.match[q] >= 0) & (table.match[k] >= 0) & (k_type == TOKEN_R)
        other = (table.match[q] != table.match[k]).long()
        cols = other * len(AGE_LABELS) + age_bucket(table.timestamps[q] - table.timestamps[k])
        return torch.where(known, cols, torch.full_like(cols, -1))
    raise ValueError(f"unknown view {view!r}; views: {list(grouping.views)}")


__all__ = ["AGE_EDGES_S", "AGE_LABELS", "Grouping", "TokenTable", "age_bucket", "make_grouping",
           "pair_columns", "token_table"]
