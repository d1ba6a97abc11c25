"""Plain PyTorch HSTU attention with GQA: the truth every faster backend is tested against.

Deliberately the most literal form of paper eq. 8 / 15: pad every user's queries and keys to
the batch maximum, build the dense ``[B, Lq, Lk]`` mask from the rule in
:mod:`mtfm.model.mask` (over *all* tokens, T-tokens included), repeat each key/value group for
its ``H / G`` query heads, and compute ``SiLU(alpha Q K^T + bias) * M / n`` times ``V``.
It pays for padding and for the always-masked T columns; that is the point: nothing clever.

:func:`record_scores` is the one window into it: inside that block every call also appends a
:class:`ScoreRecord` (its inputs, the masked score matrix it multiplies with ``V``, and where each
padded row and column comes from). Only ``mtfm explain`` (:mod:`mtfm.explain`) uses it, so its
heatmaps are the numbers this function computes, not a second implementation that could drift;
outside the block nothing is recorded and nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm.data.batch import TOKEN_T
from mtfm.kernels.common import (
    AttentionLayout,
    AttentionParams,
    QuerySet,
    bias_index,
    check_shapes,
    empty_output,
    visible_rank_gap,
)
from mtfm.model.mask import visible


@dataclass(frozen=True)
class ScoreRecord:
    """One :func:`reference_attention` call seen by :func:`record_scores`.

    ``weights [B, H, Lq, Lk]``: ``SiLU(alpha Q K^T + bias) * M / n`` exactly as multiplied with ``V``
    (zero where masked); ``mask [B, Lq, Lk]``: the dynamic mask; ``q_token [B, Lq]`` / ``k_token
    [B, Lk]``: the flat token position of each padded row / column (-1: padding). The call's own
    inputs are kept (not copied) so a test can rerun them on another backend.
    """

    weights: Tensor
    mask: Tensor
    q_token: Tensor
    k_token: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    queries: QuerySet
    layout: AttentionLayout
    params: AttentionParams


_RECORDS: ContextVar[list[ScoreRecord] | None] = ContextVar("mtfm_reference_score_records", default=None)


@contextmanager
def record_scores() -> Iterator[list[ScoreRecord]]:
    """Collect a :class:`ScoreRecord` of every :func:`reference_attention` call in the block, in call order."""
    records: list[ScoreRecord] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def _pad(values: Tensor, user: Tensor, pos: Tensor, batch: int, length: int) -> Tensor:
    """Scatter rows ``values[i]`` to ``[user[i], pos[i]]`` of a zero ``[batch, length, ...]`` tensor."""
    out = values.new_zeros((batch, length, *values.shape[1:]))
    return out.index_put((user, pos), values)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, layout: AttentionLayout, params: AttentionParams
) -> Tensor:
    """``[Nq, H, dv]`` attention output of the query tokens (see :mod:`mtfm.kernels.common`)."""
    check_shapes(q, k, v, queries, layout, params)
    batch, heads, groups = layout.batch_size, q.shape[1], k.shape[1]
    if queries.num_queries == 0:
        return empty_output(q, k, v, params)

    # Keys: every token of the user, padded (``*_slot``: column in the padded block; ``*_seq``: position for the bias).
    k_user = layout.user
    k_slot = torch.arange(layout.num_tokens, device=k.device) - layout.offsets[k_user]
    k_len = int((layout.offsets[1:] - layout.offsets[:-1]).max())
    flat = torch.arange(layout.num_tokens, device=k.device)
    kp, vp = _pad(k, k_user, k_slot, batch, k_len), _pad(v, k_user, k_slot, batch, k_len)
    k_valid = _pad(torch.ones_like(flat, dtype=torch.bool), k_user, k_slot, batch, k_len)
    k_type = _pad(layout.token_type, k_user, k_slot, batch, k_len)
    k_time = _pad(layout.timestamps, k_user, k_slot, batch, k_len)
    k_expiry = _pad(layout.expiry, k_user, k_slot, batch, k_len)
    k_flat = _pad(flat, k_user, k_slot, batch, k_len)

    # Queries, padded the same way.
    q_user = layout.user[queries.index]
    q_slot = torch.arange(queries.num_queries, device=q.device) - queries.offsets[q_user]
    q_len = int((queries.offsets[1:] - queries.offsets[:-1]).max())
    qp = _pad(q, q_user, q_slot, batch, q_len)
    q_valid = _pad(torch.ones_like(queries.index, dtype=torch.bool), q_user, q_slot, batch, q_len)
    q_time = _pad(layout.timestamps[queries.index], q_user, q_slot, batch, q_len)
    q_flat = _pad(queries.index, q_user, q_slot, batch, q_len)
    q_own = _pad(k_slot[queries.index], q_user, q_slot, batch, q_len)  # the query's own key column

    mask = visible(q_time[:, :, None], q_flat[:, :, None], k_type[:, None, :], k_time[:, None, :],
                   k_expiry[:, None, :], k_flat[:, None, :])
    mask = mask & q_valid[:, :, None] & k_valid[:, None, :]  # [B, Lq, Lk]

    # GQA by repeating each key/value group for its H / G query heads (head h uses group h // r).
    r = heads // groups
    kh, vh = kp.repeat_interleave(r, dim=2), vp.repeat_interleave(r, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kh) * params.alpha
    # Position gaps over the keys each query sees; T columns (never context) are left out.
    dpos = visible_rank_gap(mask & (k_type != TOKEN_T)[:, None, :] & k_valid[:, None, :], q_own) if params.position_buckets \
        else torch.zeros((), dtype=torch.long, device=q.device)
    index = bias_index(q_time[:, :, None] - k_time[:, None, :], dpos, params)
    if index is not None:
        scores = scores + params.bias[:, index].permute(1, 0, 2, 3)
    weights = torch.where(mask[:, None], F.silu(scores), torch.zeros_like(scores)) * params.norm
    out = torch.einsum("bhqk,bkhd->bqhd", weights, vh)
    records = _RECORDS.get()
    if records is not None:
        records.append(ScoreRecord(weights.detach(), mask, torch.where(q_valid, q_flat, -1),
                                   torch.where(k_valid, k_flat, -1), q, k, v, queries, layout, params))
    return out[q_user, q_slot]
