"""Block-wise sums of captured attention scores: T-tokens of scenario s over key group c.

For every layer and view (:mod:`mtfm.explain.groups`) the scores are averaged over heads, then
summed over the visible (query, key) pairs of each block, with the number of pairs and of
queries. Two readings follow from the same sums, and both are reported because they answer
different questions:

* ``mean_weight = sum / pairs``: how strongly one T-token of s attends to one action of group c
  (independent of how many such actions a user has);
* ``mass = sum / queries``: how much score in total a T-token of s puts on group c (what the
  layer's output is made of; grows with the group's size).

Only pairs the dynamic mask lets through are counted; a block no visible pair falls in has no
value (NaN, ``null`` in JSON), never a zero that could be mistaken for "attends little". The
scores of pairs the mask hides are summed in absolute value as a check (``masked_abs_sum``):
the reference attention makes them exactly zero, so it must stay 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtfm.data.batch import TOKEN_T
from mtfm.explain.groups import Grouping, TokenTable, pair_columns
from mtfm.kernels.reference import ScoreRecord


class BlockSums:
    """Running sums over batches for one set of users, every layer and view."""

    def __init__(self, grouping: Grouping, layers: list[str]) -> None:
        self.grouping, self.layers = grouping, list(layers)
        rows = len(grouping.scenarios)
        self.sums = {v: np.zeros((len(layers), rows, len(c))) for v, c in grouping.views.items()}
        self.pairs = {v: np.zeros((len(layers), rows, len(c)), dtype=np.int64) for v, c in grouping.views.items()}
        self.queries = np.zeros(rows, dtype=np.int64)
        self.masked_abs_sum = np.zeros(len(layers))
        self.samples = 0
        self.users: set[int] = set()

    def add(self, records: list[ScoreRecord], table: TokenTable, keep: Tensor, user_ids: Tensor) -> None:
        """Add one batch: ``records`` (one per layer), its :class:`TokenTable`, ``keep [B]``: which samples count."""
        if len(records) != len(self.layers):
            raise ValueError(f"{len(records)} score records for {len(self.layers)} layers")
        if not bool(keep.any()):
            return
        self.samples += int(keep.sum())
        self.users.update(int(u) for u in user_ids[keep].tolist())
        t_tokens = torch.nonzero((table.token_type == TOKEN_T) & keep[table.user]).flatten()
        self.queries += np.bincount(table.row[t_tokens].numpy(), minlength=len(self.grouping.scenarios))
        for i, rec in enumerate(records):
            q_tok, k_tok = rec.q_token.cpu(), rec.k_token.cpu()
            q_ok = q_tok >= 0
            q_safe = q_tok.clamp(min=0)
            q_sel = q_ok & (table.token_type[q_safe] == TOKEN_T) & keep[table.user[q_safe]]  # [B, Lq]
            pair_ok = q_sel[:, :, None] & (k_tok >= 0)[:, None, :]
            w = rec.weights.detach().cpu().double().mean(1)  # [B, Lq, Lk], heads averaged
            mask = rec.mask.cpu()
            self.masked_abs_sum[i] += float(w[pair_ok & ~mask].abs().sum())
            b, qi, ki = torch.nonzero(pair_ok & mask, as_tuple=True)
            q, k, values = q_tok[b, qi], k_tok[b, ki], w[b, qi, ki]
            rows = table.row[q]
            for view, columns in self.grouping.views.items():
                cols = pair_columns(view, self.grouping, table, q, k)
                shown = cols >= 0
                flat = (rows[shown] * len(columns) + cols[shown]).numpy()
                size = len(self.grouping.scenarios) * len(columns)
                self.sums[view][i] += np.bincount(flat, weights=values[shown].numpy(), minlength=size).reshape(
                    -1, len(columns))
                self.pairs[view][i] += np.bincount(flat, minlength=size).reshape(-1, len(columns))

    def matrices(self) -> dict:
        """JSON-ready result: per view, per layer ``mean_weight``, ``mass``, ``pairs`` and the mean over layers."""
        out: dict = {"samples": self.samples, "users": len(self.users),
                     "queries": dict(zip(self.grouping.scenarios, self.queries.tolist())),
                     "masked_abs_sum": dict(zip(self.layers, self.masked_abs_sum.tolist())), "views": {}}
        for view, columns in self.grouping.views.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(self.pairs[view] > 0, self.sums[view] / self.pairs[view], np.nan)
                mass = np.where(self.pairs[view] > 0, self.sums[view] / self.queries[None, :, None], np.nan)
            layers = {name: {"mean_weight": _json(mean[i]), "mass": _json(mass[i]),
                             "pairs": self.pairs[view][i].tolist()}
                      for i, name in enumerate(self.layers)}
            out["views"][view] = {
                "rows": list(self.grouping.scenarios), "columns": list(columns), "layers": layers,
                # the same pairs in every layer (one mask), so the layer mean is NaN exactly where each layer is
                "all_layers": {"mean_weight": _json(mean.mean(0)), "mass": _json(mass.mean(0))},
            }
        return out


def _json(matrix: np.ndarray) -> list[list[float | None]]:
    """A float matrix as nested lists, NaN as None (valid JSON)."""
    return [[None if np.isnan(x) else float(x) for x in row] for row in matrix]


def from_json(matrix: list[list[float | None]]) -> np.ndarray:
    """The inverse of the JSON form: None back to NaN."""
    return np.array([[np.nan if x is None else x for x in row] for row in matrix], dtype=np.float64)
