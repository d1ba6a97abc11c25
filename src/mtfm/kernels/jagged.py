"""CPU attention that pays neither for padding nor for the T-columns the mask always hides.

Three things make this cheaper than the reference:

* keys: by the dynamic mask no token attends to *another* T-token. So each query attends to
  its user's context tokens (H and R) plus, for a T query, its own key. The context part is a
  dense ``[Lq, C]`` block per user; the self part is one dot product per T query.
  A target layer thus costs ``O(L_T * C)`` and a full layer ``O(N * C)`` instead of ``O(N^2)``.
* padding: users are sorted by context length and greedily grouped into buckets whose padded
  block size stays within ``1 + slack`` of the real work (``ModelConfig.jagged_padding_slack``),
  so one batched matmul per bucket replaces one per user, at a bounded padding cost.
* memory: a bucket's ``[Lq, C]`` scores and mask are never stored. :class:`_BlockAttention`
  computes them in query chunks that fit in cache (the mask from each token's type, timestamp
  and id), keeps only Q, K, V for the backward pass and recomputes each chunk there (the CPU
  analogue of a flash-attention kernel), so a layer's memory grows with ``N``, not ``N * C``.

GQA is computed without repeating keys: queries are viewed as ``[G, H / G]`` so each key/value
group is read once. The per-batch plan (buckets and their gather indices and token metadata)
is built once and cached in the :class:`AttentionLayout`, then reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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

# A bucket may also waste up to this many score cells regardless of the slack, so a tail of
# tiny users does not become one bucket each.
_MIN_WASTE = 65536
# What one more bucket costs, in score cells: its fixed per-op overhead (forward and backward),
# measured on the small preset as roughly what 16K padded cells of attention cost.
_BUCKET_COST = 16384
# Score cells (batch x heads x query rows x keys) per chunk: 256K floats = 1 MiB, cache-sized.
_CHUNK_CELLS = 1 << 18
# Buckets with at most this many score cells (all heads) skip the chunked kernel and keep their
# intermediates for autograd (4M floats = 16 MiB per intermediate, about 3 per bucket).
_DIRECT_CELLS = 1 << 22


@dataclass
class _Bucket:
    """One bucket's gather indices and the token metadata its masks and biases are computed from.

    Masks are never stored: each chunk rebuilds its ``[nb, q, C]`` mask from these ``[nb, Lq]``
    and ``[nb, C]`` vectors (padding slots get ids that no rule makes visible: query -2, key -1
    with the T type).
    """

    q_rows: Tensor  # long [nb, Lq]: rows of the query array (clamped to 0 where padding)
    k_pos: Tensor  # long [nb, C]: flat token positions of the context keys (clamped to 0 where padding)
    valid_flat: Tensor  # long [n_valid]: positions in the flattened [nb * Lq] block holding a real query
    q_id: Tensor  # long [nb, Lq]: flat token position, -2 for padding
    q_time: Tensor  # long [nb, Lq]
    q_col: Tensor  # long [nb, Lq]: the query's own column among its user's context keys (T: just past them)
    k_id: Tensor  # long [nb, C]: flat token position, -1 for padding
    k_type: Tensor  # long [nb, C]: TOKEN_T for padding (visible to no other token)
    k_time: Tensor  # long [nb, C]
    k_expiry: Tensor  # long [nb, C]
    dense: dict = field(default_factory=dict, repr=False)  # whole-block masks / bias columns (direct path)

    def mask(self, s: int, e: int) -> Tensor:
        """``[nb, e - s, C]`` visibility of query rows ``s:e`` (padding never visible)."""
        return visible(self.q_time[:, s:e, None], self.q_id[:, s:e, None], self.k_type[:, None, :],
                       self.k_time[:, None, :], self.k_expiry[:, None, :], self.k_id[:, None, :])

    def bias_index(self, s: int, e: int, params: AttentionParams) -> Tensor | None:
        """``[nb, e - s, C]`` bias-table columns of query rows ``s:e`` (position gaps over visible keys)."""
        if params.position_buckets:
            dpos = visible_rank_gap(self.mask(s, e), self.q_col[:, s:e])
        else:
            dpos = torch.zeros((), dtype=torch.long, device=self.q_time.device)
        return bias_index(self.q_time[:, s:e, None] - self.k_time[:, None, :], dpos, params)

    @property
    def cells(self) -> int:
        """Score cells of the whole block per head (``nb * Lq * C``)."""
        return int(self.q_rows.numel()) * int(self.k_pos.shape[1])

    def dense_weight(self, dtype: torch.dtype, norm: float) -> Tensor:
        """``M / n`` of the whole block as ``[nb, 1, 1, Lq, C]`` numbers, built once per forward pass.

        Every layer of a forward pass sees the same token metadata, so the mask (and below the
        bias columns) of a direct-path bucket is computed by the first layer and reused.
        """
        key = ("weight", dtype, norm)
        if key not in self.dense:
            self.dense[key] = (self.mask(0, self.q_rows.shape[1]).to(dtype) * norm)[:, None, None]
        return self.dense[key]

    def dense_bias_index(self, params: AttentionParams, heads: int) -> Tensor:
        """Flat positions in the ``[H * width]`` bias table for every ``[nb, H, Lq, C]`` cell, built once.

        Indexing the flattened table with one index per head lays the gathered bias out in the
        scores' own order, so no permuted copy is needed.
        """
        key = ("bias", params.time_buckets, params.position_buckets, heads)
        if key not in self.dense:
            column = self.bias_index(0, self.q_rows.shape[1], params)  # [nb, Lq, C]
            width = max(params.time_buckets, 1) * max(params.position_buckets, 1)
            head = torch.arange(heads, device=column.device)[None, :, None, None] * width
            self.dense[key] = (column[:, None] + head).flatten()
        return self.dense[key]


@dataclass
class _Plan:
    buckets: list[_Bucket]
    out_rows: Tensor  # long: query rows in the order the buckets emit them
    self_rows: Tensor  # long: query rows that are T-tokens (their own key is not in the context)
    padded_cells: int  # score cells computed per head (for reporting the padding overhead)
    real_cells: int
    q_index: Tensor  # long: every bucket's q_rows, flattened and concatenated (one gather per layer)
    k_index: Tensor  # long: every bucket's k_pos, likewise
    gather: Tensor  # long [Nq]: row of each query in the concatenated padded outputs (+ one zero row)


def _best_runs(q: np.ndarray, c: np.ndarray, slack: float) -> tuple[float, list[tuple[int, int]]]:
    """Cheapest split of the users in this order into runs ``[i, j)`` (dynamic programming)."""
    n = len(q)
    real_cum = np.concatenate([[0.0], np.cumsum(q * c)])
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        # Bucket users[i:j] for every i < j: block shape = running maxima from the right.
        lq = np.maximum.accumulate(q[:j][::-1])[::-1]
        lc = np.maximum.accumulate(c[:j][::-1])[::-1]
        padded = (j - np.arange(j)) * lq * lc
        real = real_cum[j] - real_cum[:j]
        ok = (padded <= (1.0 + slack) * real) | (padded - real <= _MIN_WASTE)
        cost = np.where(ok, best[:j] + padded + _BUCKET_COST, np.inf)
        i = int(np.argmin(cost))
        best[j], start[j] = cost[i], i
    runs: list[tuple[int, int]] = []
    j = n
    while j > 0:
        runs.append((int(start[j]), j))
        j = int(start[j])
    return float(best[n]), runs[::-1]


def group_users(q_len: list[int], c_len: list[int], slack: float) -> list[list[int]]:
    """Buckets of users with similar block shapes, padding within ``1 + slack`` (or ``_MIN_WASTE`` cells).

    The users are sorted by context length (then query length), and also the other way round;
    for each order, the split into runs with the least padded cells plus ``_BUCKET_COST`` per
    bucket (the fixed cost of a bucket's ops, forward and backward, in score cells) is found by
    dynamic programming, and the cheaper order wins. A bucket is admissible only within the
    padding bound above. Users with no query or no context key need no block and are left out.
    """
    active = [u for u in range(len(q_len)) if q_len[u] > 0 and c_len[u] > 0]
    if not active:
        return []
    best: tuple[float, list[list[int]]] | None = None
    for key in (lambda u: (-c_len[u], -q_len[u]), lambda u: (-q_len[u], -c_len[u])):
        users = sorted(active, key=key)
        q = np.array([q_len[u] for u in users], dtype=np.float64)
        c = np.array([c_len[u] for u in users], dtype=np.float64)
        cost, runs = _best_runs(q, c, slack)
        if best is None or cost < best[0]:
            best = (cost, [users[i:j] for i, j in runs])
    return best[1]


def _block_index(starts: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``[nb, width]`` indices ``start + j`` and validity ``j < length``."""
    j = torch.arange(width, device=starts.device)
    valid = j[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + j[None, :], torch.zeros_like(valid, dtype=torch.long))
    return index, valid


def _build_plan(queries: QuerySet, layout: AttentionLayout, slack: float) -> _Plan:
    context = layout.context()
    q_len_t = queries.offsets[1:] - queries.offsets[:-1]
    c_len_t = context.offsets[1:] - context.offsets[:-1]
    q_len, c_len = q_len_t.tolist(), c_len_t.tolist()
    seq = layout.positions()
    buckets: list[_Bucket] = []
    out_rows: list[Tensor] = []
    padded_cells = real_cells = 0
    for members in group_users(q_len, c_len, slack):
        users = torch.tensor(members, dtype=torch.long, device=queries.index.device)
        lq, c = max(q_len[u] for u in members), max(c_len[u] for u in members)
        q_rows, q_valid = _block_index(queries.offsets[users], q_len_t[users], lq)
        c_rows, c_valid = _block_index(context.offsets[users], c_len_t[users], c)
        k_pos, q_pos = context.index[c_rows], queries.index[q_rows]
        valid_flat = torch.nonzero(q_valid.flatten()).flatten()
        buckets.append(_Bucket(
            q_rows=q_rows,
            k_pos=k_pos,
            valid_flat=valid_flat,
            q_id=torch.where(q_valid, q_pos, torch.full_like(q_pos, -2)),
            q_time=layout.timestamps[q_pos],
            q_col=seq[q_pos],
            k_id=torch.where(c_valid, k_pos, torch.full_like(k_pos, -1)),
            k_type=torch.where(c_valid, layout.token_type[k_pos], torch.full_like(k_pos, TOKEN_T)),
            k_time=layout.timestamps[k_pos],
            k_expiry=layout.expiry[k_pos],
        ))
        out_rows.append(q_rows.flatten()[valid_flat])
        padded_cells += len(members) * lq * c
        real_cells += sum(q_len[u] * c_len[u] for u in members)
    device = queries.index.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    self_rows = torch.nonzero(layout.token_type[queries.index] == TOKEN_T).flatten()
    # Queries without any context key read the zero row appended after the buckets' outputs.
    zero_row = sum(b.q_rows.numel() for b in buckets)
    gather = torch.full((queries.num_queries,), zero_row, dtype=torch.long, device=device)
    base = 0
    for b, rows in zip(buckets, out_rows):
        gather[rows] = base + b.valid_flat
        base += b.q_rows.numel()
    q_index = torch.cat([b.q_rows.flatten() for b in buckets]) if buckets else empty
    k_index = torch.cat([b.k_pos.flatten() for b in buckets]) if buckets else empty
    return _Plan(buckets, torch.cat(out_rows) if out_rows else empty, self_rows, padded_cells, real_cells,
                 q_index, k_index, gather)


def plan_for(queries: QuerySet, layout: AttentionLayout, slack: float) -> _Plan:
    """The cached plan of this query set (built on first use in a forward pass)."""
    key = ("jagged_plan", id(queries), slack)
    if key not in layout.cache:
        # The query set is stored with its plan so its id cannot be reused while cached.
        layout.cache[key] = (queries, _build_plan(queries, layout, slack))
    return layout.cache[key][1]


def _chunk_weights(q: Tensor, k: Tensor, bucket: _Bucket, s: int, e: int, params: AttentionParams, bias: Tensor | None):
    """Scores, SiLU gate and mask of query rows ``s:e``: ``(scores, sigmoid(scores), mask)``, ``[nb, G, r, q, C]``."""
    scores = torch.einsum("bqgrd,bcgd->bgrqc", q[:, s:e], k)
    if bias is not None:
        nb, _, groups, r, _ = q.shape
        index = bucket.bias_index(s, e, params)
        scores = scores + bias[:, index].view(groups, r, nb, e - s, -1).permute(2, 0, 1, 3, 4)
    return scores, torch.sigmoid(scores), bucket.mask(s, e)[:, None, None]


class _BlockAttention(torch.autograd.Function):
    """``SiLU(QK^T + bias) * M / n @ V`` over one bucket, chunked over queries, recomputed in backward.

    Shapes: q ``[nb, Lq, G, r, d]`` (scaled by alpha), k ``[nb, C, G, d]``, v ``[nb, C, G, dv]``,
    bias ``[H, M]`` or None. Returns ``[nb, Lq, G, r, dv]``. Only q, k, v (and the bias table)
    are kept for the backward pass; masks and scores are rebuilt chunk by chunk.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, bucket: _Bucket, params: AttentionParams) -> Tensor:
        nb, lq, groups, r, _ = q.shape
        step = max(1, _CHUNK_CELLS // max(1, nb * groups * r * k.shape[1]))
        out = q.new_empty((nb, lq, groups, r, v.shape[-1]))
        for s in range(0, lq, step):
            e = min(lq, s + step)
            scores, sig, mask = _chunk_weights(q, k, bucket, s, e, params, bias)
            # Masked entries become exactly 0, as in the reference's torch.where.
            weights = (scores * sig * params.norm).masked_fill_(~mask, 0)
            out[:, s:e] = torch.einsum("bgrqc,bcgd->bqgrd", weights, v)
        ctx.save_for_backward(q, k, v, bias)
        ctx.bucket, ctx.params, ctx.step = bucket, params, step
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias = ctx.saved_tensors
        bucket, params, lq = ctx.bucket, ctx.params, q.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dbias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        for s in range(0, lq, ctx.step):
            e = min(lq, s + ctx.step)
            g_c = grad_out[:, s:e].to(q.dtype)
            scores, sig, mask = _chunk_weights(q, k, bucket, s, e, params, bias)
            weights = (scores * sig * params.norm).masked_fill_(~mask, 0)
            dv += torch.einsum("bgrqc,bqgrd->bcgd", weights, g_c)
            dweights = torch.einsum("bqgrd,bcgd->bgrqc", g_c, v)
            # d SiLU(s) / ds = sig (1 + s (1 - sig))
            dscores = (dweights * (sig * (1 + scores * (1 - sig))) * params.norm).masked_fill_(~mask, 0)
            dq[:, s:e] = torch.einsum("bgrqc,bcgd->bqgrd", dscores, k)
            dk += torch.einsum("bgrqc,bqgrd->bcgd", dscores, q[:, s:e])
            if dbias is not None:
                index = bucket.bias_index(s, e, params)
                flat = dscores.permute(1, 2, 0, 3, 4).reshape(dbias.shape[0], -1)  # [H, nb * q * C], head = g * r + j
                dbias.index_add_(1, index.reshape(-1), flat)
        return dq, dk, dv, dbias, None, None


def _direct_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, bucket: _Bucket, params: AttentionParams) -> Tensor:
    """The same as :class:`_BlockAttention` for a block small enough to keep: plain autograd ops.

    For the short users of a recommendation batch the chunked kernel's cost is per-op
    overhead, not arithmetic; here the whole block is a handful of batched ops whose
    ``[nb, H, Lq, C]`` intermediates autograd keeps for the backward pass (bounded by
    ``_DIRECT_CELLS``), and the mask and bias columns come from the per-forward plan.
    """
    nb, lq, groups, r, _ = q.shape
    c = k.shape[1]
    scores = torch.einsum("bqgrd,bcgd->bgrqc", q, k)
    if bias is not None:
        index = bucket.dense_bias_index(params, groups * r)
        # index_select on the flat table: its backward is an index_add (advanced indexing's is far slower).
        scores = scores + bias.flatten().index_select(0, index).view(nb, groups, r, lq, c)
    # Masked cells are multiplied by exactly 0 (scores are finite), as the reference's torch.where gives.
    weights = F.silu(scores) * bucket.dense_weight(scores.dtype, params.norm)
    return torch.einsum("bgrqc,bcgd->bqgrd", weights, v)


def _bucket_attention(q: Tensor, k: Tensor, v: Tensor, b: _Bucket, params: AttentionParams) -> Tensor:
    """Attention of one bucket's gathered blocks ``q [nb, Lq, G, r, d]``, ``k, v [nb, C, G, d]``.

    Blocks of at most ``_DIRECT_CELLS`` score cells (all heads) take the direct path, larger
    ones the chunked kernel that recomputes scores in backward (memory O(N), not O(N * C)).
    Returns ``[nb * Lq, H, dv]`` (padding rows included).
    """
    nb, lq, groups, r, _ = q.shape
    bias = params.bias.to(q.dtype) if params.bias is not None else None
    if b.cells * groups * r <= _DIRECT_CELLS:
        out = _direct_attention(q, k, v, bias, b, params)
    else:
        out = _BlockAttention.apply(q, k, v, bias, b, params)
    return out.reshape(nb * lq, groups * r, v.shape[-1])


def _self_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, pos: Tensor, params: AttentionParams) -> Tensor:
    """Each T query's attention to its own key (the one T column the mask leaves open)."""
    groups = k.shape[1]
    heads, r = q.shape[1], q.shape[1] // groups
    qs = q.index_select(0, rows).view(-1, groups, r, q.shape[2])  # q already carries alpha
    k_own, v_own = k.index_select(0, pos), v.index_select(0, pos)
    score = torch.einsum("ngrd,ngd->ngr", qs, k_own)
    if params.bias is not None:
        score = score + params.bias[:, 0].view(groups, r)  # time and position gap 0 -> column 0
    weight = F.silu(score) * params.norm
    # An outer product written as a matmul with inner size 1, so FLOP counters see it too.
    return torch.matmul(weight[..., None], v_own[:, :, None, :]).reshape(-1, heads, v.shape[2])


def _all_buckets(q: Tensor, k: Tensor, v: Tensor, plan: _Plan, params: AttentionParams) -> list[Tensor]:
    """Every bucket's padded output ``[nb * Lq, H, dv]``, from one gather of q, k and v each."""
    heads, groups, d, dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    q_all = q.index_select(0, plan.q_index).split([b.q_rows.numel() for b in plan.buckets])
    k_sizes = [b.k_pos.numel() for b in plan.buckets]
    k_all = k.index_select(0, plan.k_index).split(k_sizes)
    v_all = v.index_select(0, plan.k_index).split(k_sizes)
    return [
        _bucket_attention(qb.view(*b.q_rows.shape, groups, heads // groups, d), kb.view(*b.k_pos.shape, groups, d),
                          vb.view(*b.k_pos.shape, groups, dv), b, params)
        for b, qb, kb, vb in zip(plan.buckets, q_all, k_all, v_all)
    ]


def jagged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    queries: QuerySet,
    layout: AttentionLayout,
    params: AttentionParams,
) -> Tensor:
    """Same contract and result as :func:`mtfm.kernels.reference.reference_attention`."""
    check_shapes(q, k, v, queries, layout, params)
    if queries.num_queries == 0:
        return empty_output(q, k, v, params)
    plan = plan_for(queries, layout, params.padding_slack)
    heads = q.shape[1]
    q = q * params.alpha  # scale the small query tensor, not the [Lq, C] scores
    dv = v.shape[2]
    # One gather per tensor for all buckets (and so one index_add per tensor in backward).
    parts: list[Tensor] = []
    if plan.buckets:
        parts = _all_buckets(q, k, v, plan, params)
    parts.append(q.new_zeros((1, heads, dv)))
    out = torch.cat(parts).index_select(0, plan.gather)
    if plan.self_rows.numel():
        own = _self_attention(q, k, v, plan.self_rows, queries.index[plan.self_rows], params)
        out = out.index_add(0, plan.self_rows, own.to(out.dtype))
    return out
