"""CPU attention that pays neither for padding nor for the T-columns the mask always hides.

Two facts make this cheaper than the reference:

* keys: by the dynamic mask no token attends to *another* T-token. So each query attends to
  its user's context tokens (H and R) plus, for a T query, its own key. The context part is a
  dense ``[Lq, C]`` block per user; the self part is one dot product per T query.
  A target layer thus costs ``O(L_T * C)`` and a full layer ``O(N * C)`` instead of ``O(N^2)``.
* padding: users are sorted by context length and greedily grouped into buckets whose padded
  block size stays within ``1 + slack`` of the real work (``ModelConfig.jagged_padding_slack``),
  so one batched matmul per bucket replaces one per user, at a bounded padding cost.

GQA is computed without repeating keys: queries are viewed as ``[G, H / G]`` so each key/value
group is read once. The per-batch plan (buckets, masks, time buckets) is built once and cached
in the :class:`AttentionLayout`, then reused by every layer of the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm.data.batch import TOKEN_T
from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, check_shapes, empty_output, time_buckets
from mtfm.model.mask import visible

# A bucket may also waste up to this many score cells regardless of the slack, so a tail of
# tiny users does not become one bucket each.
_MIN_WASTE = 4096


@dataclass
class _Bucket:
    q_rows: Tensor  # long [nb, Lq]: rows of the query array (clamped where invalid)
    k_pos: Tensor  # long [nb, C]: flat token positions of the context keys (clamped where invalid)
    mask: Tensor  # bool [nb, Lq, C]: visible and valid
    valid_flat: Tensor  # long [n_valid]: positions in the flattened [nb * Lq] block holding a real query
    time_bucket: Tensor | None  # long [nb, Lq, C]


@dataclass
class _Plan:
    buckets: list[_Bucket]
    out_rows: Tensor  # long: query rows in the order the buckets emit them
    self_rows: Tensor  # long: query rows that are T-tokens (their own key is not in the context)
    padded_cells: int  # score cells computed per head (for reporting the padding overhead)
    real_cells: int


def group_users(q_len: list[int], c_len: list[int], slack: float) -> list[list[int]]:
    """Greedy buckets of users with similar block shapes; padding within ``1 + slack`` (plus a small floor).

    Users with no query or no context key need no block and are left out.
    """
    users = sorted((u for u in range(len(q_len)) if q_len[u] > 0 and c_len[u] > 0), key=lambda u: (-c_len[u], -q_len[u]))
    buckets: list[list[int]] = []
    members: list[int] = []
    lq_max = c_max = real = 0
    for u in users:
        if members:
            new_lq = max(lq_max, q_len[u])
            new_real = real + q_len[u] * c_len[u]
            padded = (len(members) + 1) * new_lq * c_max
            if padded <= (1.0 + slack) * new_real or padded - new_real <= _MIN_WASTE:
                members.append(u)
                lq_max, real = new_lq, new_real
                continue
            buckets.append(members)
        members, lq_max, c_max, real = [u], q_len[u], c_len[u], q_len[u] * c_len[u]
    if members:
        buckets.append(members)
    return buckets


def _block_index(starts: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``[nb, width]`` indices ``start + j`` and validity ``j < length``."""
    j = torch.arange(width, device=starts.device)
    valid = j[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + j[None, :], torch.zeros_like(valid, dtype=torch.long))
    return index, valid


def _build_plan(queries: QuerySet, layout: AttentionLayout, num_time_buckets: int | None, slack: float) -> _Plan:
    context = layout.context()
    q_len_t = queries.offsets[1:] - queries.offsets[:-1]
    c_len_t = context.offsets[1:] - context.offsets[:-1]
    q_len, c_len = q_len_t.tolist(), c_len_t.tolist()
    buckets: list[_Bucket] = []
    out_rows: list[Tensor] = []
    padded_cells = real_cells = 0
    for members in group_users(q_len, c_len, slack):
        users = torch.tensor(members, dtype=torch.long, device=queries.index.device)
        lq, c = max(q_len[u] for u in members), max(c_len[u] for u in members)
        q_rows, q_valid = _block_index(queries.offsets[users], q_len_t[users], lq)
        c_rows, c_valid = _block_index(context.offsets[users], c_len_t[users], c)
        k_pos = context.index[c_rows]
        q_pos = queries.index[q_rows]
        q_time, k_time = layout.timestamps[q_pos], layout.timestamps[k_pos]
        mask = visible(q_time[:, :, None], q_pos[:, :, None], layout.token_type[k_pos][:, None, :], k_time[:, None, :], k_pos[:, None, :])
        mask = mask & q_valid[:, :, None] & c_valid[:, None, :]
        tb = time_buckets(q_time[:, :, None] - k_time[:, None, :], num_time_buckets) if num_time_buckets else None
        valid_flat = torch.nonzero(q_valid.flatten()).flatten()
        buckets.append(_Bucket(q_rows, k_pos, mask, valid_flat, tb))
        out_rows.append(q_rows.flatten()[valid_flat])
        padded_cells += len(members) * lq * c
        real_cells += sum(q_len[u] * c_len[u] for u in members)
    empty = torch.zeros(0, dtype=torch.long, device=queries.index.device)
    self_rows = torch.nonzero(layout.token_type[queries.index] == TOKEN_T).flatten()
    return _Plan(buckets, torch.cat(out_rows) if out_rows else empty, self_rows, padded_cells, real_cells)


def plan_for(queries: QuerySet, layout: AttentionLayout, num_time_buckets: int | None, slack: float) -> _Plan:
    """The cached plan of this query set (built on first use in a forward pass)."""
    key = ("jagged_plan", id(queries), num_time_buckets, slack)
    if key not in layout.cache:
        # The query set is stored with its plan so its id cannot be reused while cached.
        layout.cache[key] = (queries, _build_plan(queries, layout, num_time_buckets, slack))
    return layout.cache[key][1]


def _bucket_attention(q: Tensor, k: Tensor, v: Tensor, b: _Bucket, params: AttentionParams) -> Tensor:
    """Attention of one bucket's queries over their users' context keys: ``[n_valid, H, dv]``."""
    groups = k.shape[1]
    nb, lq = b.q_rows.shape
    heads, r = q.shape[1], q.shape[1] // groups
    qb = q[b.q_rows].view(nb, lq, groups, r, q.shape[2])
    kb, vb = k[b.k_pos], v[b.k_pos]  # [nb, C, G, d]
    scores = torch.einsum("bqgrd,bcgd->bgrqc", qb, kb) * params.alpha
    if b.time_bucket is not None and params.time_bias is not None:
        bias = params.time_bias[:, b.time_bucket]  # [H, nb, Lq, C]
        scores = scores + bias.view(groups, r, nb, lq, -1).permute(2, 0, 1, 3, 4)
    weights = torch.where(b.mask[:, None, None], F.silu(scores), torch.zeros_like(scores)) * params.norm
    out = torch.einsum("bgrqc,bcgd->bqgrd", weights, vb).reshape(nb * lq, heads, v.shape[2])
    return out[b.valid_flat]


def _self_attention(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, pos: Tensor, params: AttentionParams) -> Tensor:
    """Each T query's attention to its own key (the one T column the mask leaves open)."""
    groups = k.shape[1]
    heads, r = q.shape[1], q.shape[1] // groups
    qs = q[rows].view(-1, groups, r, q.shape[2])
    score = torch.einsum("ngrd,ngd->ngr", qs, k[pos]) * params.alpha
    if params.time_bias is not None:
        score = score + params.time_bias[:, 0].view(groups, r)  # time gap 0 -> bucket 0
    weight = F.silu(score) * params.norm
    # An outer product written as a matmul with inner size 1, so FLOP counters see it too.
    return torch.matmul(weight[..., None], v[pos][:, :, None, :]).reshape(-1, heads, v.shape[2])


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
        return empty_output(q, k, v)
    num_tb = params.time_bias.shape[1] if params.time_bias is not None else None
    plan = plan_for(queries, layout, num_tb, params.padding_slack)
    heads, dv = q.shape[1], v.shape[2]
    out = q.new_zeros((queries.num_queries, heads, dv))
    if plan.buckets:
        parts = torch.cat([_bucket_attention(q, k, v, b, params) for b in plan.buckets])
        out = out.index_put((plan.out_rows,), parts.to(out.dtype))
    if plan.self_rows.numel():
        own = _self_attention(q, k, v, plan.self_rows, queries.index[plan.self_rows], params)
        out = out.index_add(0, plan.self_rows, own.to(out.dtype))
    return out
