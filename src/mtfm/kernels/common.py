"""What every attention backend receives: the batch's token metadata and the attention constants.

An attention call computes, for a set of query tokens, HSTU attention (paper eq. 8 / 15)

    A[q, h] = sum_k  M[q, k] * SiLU(alpha * <Q[q, h], K[k, g(h)]> + bias_h(t_q - t_k, p_q - p_k)) / n * V[k, g(h)]

with ``g(h) = h // (H / G)`` (grouped-query attention: ``H / G`` query heads share one key/value
group), ``M`` the dynamic mask (:mod:`mtfm.model.mask`), ``alpha = 1 / sqrt(head_dim)`` and
``n`` a constant from the config (never the batch's longest sequence, so that a user's output
does not depend on which users share the batch). The optional bias is learned per head over
log2 buckets of the time gap and of the position gap (:func:`bias_index`).

Position gaps are counted in the query's *own* view, so that they cannot leak: every user's
context (H and R) tokens are numbered by :meth:`AttentionLayout.positions` (their column among
the user's context keys; a T-token sits just past the last one), and the gap between query
``q`` and key ``k`` is the number of keys *visible to q* whose column lies in
``[col(k), col(q))`` (negative, counted over ``[col(q), col(k))``, when ``k`` lies after ``q``).
A key hidden from ``q`` (an R action after it, or one outside its ``max_len`` view) therefore
never shifts ``q``'s gaps: a T query's gap to a key is how many of the keys it sees lie at or
after that key. See :func:`visible_rank_gap`.

The content match (:mod:`mtfm.model.content`) reaches the backends as ordinary query and key
columns: a layer that has it appends them before the call, so ``Q`` and ``K`` may be wider than
``V`` and no backend knows about it.

Keys and values are given for *all* N tokens of the batch (flat, in ``TokenLayout`` order);
queries are a subset (:class:`QuerySet`): every token for a full-attention layer, the T-tokens
for a target-attention layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mtfm.data.batch import NEVER, TOKEN_T, TokenLayout

QueryKind = Literal["all", "target"]


@dataclass(frozen=True)
class QuerySet:
    """Query tokens: flat token positions ``index`` [Nq], grouped by user (``offsets`` [B + 1])."""

    index: Tensor
    offsets: Tensor

    @property
    def num_queries(self) -> int:
        return self.index.shape[0]  # not int(): a symbolic size under torch.export stays symbolic


@dataclass
class AttentionLayout:
    """Token metadata of one batch, shared by every layer of one forward pass.

    Backends may cache per-batch plans in ``cache`` (for instance the jagged backend's user
    buckets and masks), so they are built once per forward and reused by all layers.
    """

    offsets: Tensor  # long [B + 1]
    token_type: Tensor  # long [N]
    timestamps: Tensor  # long [N]
    user: Tensor  # long [N]: user of each token
    expiry: Tensor | None = None  # long [N]: R-token visibility end (mtfm.model.mask); None: NEVER
    content: Tensor | None = None  # float [N, W]: unit content vectors (mtfm.model.content); None: no content match
    # one request (one user) whose first num_context tokens are its H and R tokens and the rest
    # its T-tokens (mtfm.kernels.request); None: any layout
    num_context: int | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.expiry is None:
            self.expiry = torch.full_like(self.timestamps, NEVER)

    @classmethod
    def from_token_layout(cls, layout: TokenLayout) -> "AttentionLayout":
        lengths = layout.offsets[1:] - layout.offsets[:-1]
        user = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths)
        return cls(layout.offsets, layout.token_type, layout.timestamps, user, layout.expiry)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0] - 1  # not int(): a symbolic size under torch.export stays symbolic

    @property
    def num_tokens(self) -> int:
        return self.token_type.shape[0]  # not int(): a symbolic size under torch.export stays symbolic

    def _subset(self, keep: Tensor) -> QuerySet:
        index = torch.nonzero(keep).flatten()
        counts = torch.bincount(self.user[index], minlength=self.batch_size)
        offsets = torch.zeros(self.batch_size + 1, dtype=torch.long, device=index.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return QuerySet(index, offsets)

    def queries(self, kind: QueryKind) -> QuerySet:
        """All tokens (full layer) or the T-tokens (target layer), cached."""
        key = ("queries", kind)
        if key not in self.cache:
            if kind == "all":
                index = torch.arange(self.num_tokens, device=self.token_type.device)
                self.cache[key] = QuerySet(index, self.offsets)
            elif kind == "target":
                self.cache[key] = self._subset(self.token_type == TOKEN_T)
            else:
                raise ValueError(f"unknown query kind {kind!r}; expected 'all' or 'target'")
        return self.cache[key]

    def positions(self) -> Tensor:
        """Column of every token among its user's context keys, cached.

        Context (H and R) tokens are numbered 0, 1, ... within their user in layout order;
        every T-token gets the column just after its user's last context token, so all
        T-tokens of a user are interchangeable (target permutation equivariance). Position
        gaps are counted from these columns over the keys a query sees
        (:func:`visible_rank_gap`), never from the columns themselves.
        """
        key = ("positions",)
        if key not in self.cache:
            is_ctx = (self.token_type != TOKEN_T).long()
            inclusive = torch.cumsum(is_ctx, 0)
            exclusive = torch.cat([inclusive.new_zeros(1), inclusive])  # [N + 1]: context tokens before each
            base = exclusive[self.offsets]  # [B + 1]
            rank = exclusive[:-1] - base[self.user]
            count = (base[1:] - base[:-1])[self.user]
            self.cache[key] = torch.where(is_ctx.bool(), rank, count)
        return self.cache[key]

    def context(self) -> QuerySet:
        """The non-T tokens of every user: the only keys any token attends to besides itself."""
        key = ("context",)
        if key not in self.cache:
            self.cache[key] = self._subset(self.token_type != TOKEN_T)
        return self.cache[key]


@dataclass(frozen=True)
class AttentionParams:
    """Constants and learned relative bias of one attention call.

    ``norm`` is ``1 / n``. The optional relative bias (HSTU-style) is one learned table
    ``bias [H, max(time_buckets, 1) * max(position_buckets, 1)]`` indexed by
    :func:`bias_index` (log2 buckets of the time gap and of the position gap, either may be off
    with 0 buckets). ``padding_slack``: how much padding the jagged backend may spend per
    bucket of users (other backends ignore it).
    """

    alpha: float
    norm: float
    num_kv_groups: int
    bias: Tensor | None = None
    time_buckets: int = 0
    position_buckets: int = 0
    padding_slack: float = 0.25

    def __post_init__(self) -> None:
        if self.bias is not None:
            width = max(self.time_buckets, 1) * max(self.position_buckets, 1)
            if self.bias.dim() != 2 or self.bias.shape[1] != width or not (self.time_buckets or self.position_buckets):
                raise ValueError(
                    f"attention bias must be [H, {width}] for {self.time_buckets} time and "
                    f"{self.position_buckets} position buckets (at least one > 0), got {tuple(self.bias.shape)}"
                )


def log_buckets(gap: Tensor, num_buckets: int) -> Tensor:
    """``min(floor(log2(1 + |gap|)), num_buckets - 1)``, exactly: how many of the powers of two
    ``2, 4, ..., 2^(num_buckets - 1)`` are at most ``1 + |gap|``, found by ``bucketize`` on the
    integers. (Float ``log2`` is not exact at powers of two on CUDA, where ``log2(8.0)`` gives
    2.9999999999999996; ``frexp``, used before, is exact but its int32 exponent does not compile
    under AOTInductor's vectorised CPU code in torch 2.13, which ``mtfm export --aoti`` needs.)"""
    bounds = torch.tensor([(1 << i) - 1 for i in range(1, max(num_buckets, 1))], dtype=torch.long, device=gap.device)
    return torch.bucketize(gap.abs().long(), bounds, right=True)


def visible_rank_gap(context_mask: Tensor, q_col: Tensor) -> Tensor:
    """Position gaps counted over the keys each query sees (see the module docstring).

    ``context_mask [..., Lq, C]``: which of the user's context keys (columns in layout order,
    padding and T columns False) each query sees; ``q_col [..., Lq]``: the query's own column
    (:meth:`AttentionLayout.positions`, at most ``C``). Returns ``[..., Lq, C]`` long:
    ``before(q_col) - before(col)`` with ``before(c)`` = visible keys in columns ``< c``.
    """
    seen = context_mask.long()
    if seen.shape[-1] == 0:
        return seen
    before = torch.cumsum(seen, -1) - seen  # [..., Lq, C]: visible keys left of each column
    total = before[..., -1:] + seen[..., -1:]
    before_ext = torch.cat([before, total], -1)  # [..., Lq, C + 1]
    own = before_ext.gather(-1, q_col.clamp(max=seen.shape[-1]).unsqueeze(-1))
    return own - before


def bias_index(dt: Tensor, dpos: Tensor, params: AttentionParams) -> Tensor | None:
    """Column of ``params.bias`` for query/key pairs with time gap ``dt`` and position gap ``dpos``."""
    if params.bias is None:
        return None
    index = torch.zeros(torch.broadcast_shapes(dt.shape, dpos.shape), dtype=torch.long, device=dt.device)
    if params.time_buckets:
        index = index + log_buckets(dt, params.time_buckets) * max(params.position_buckets, 1)
    if params.position_buckets:
        index = index + log_buckets(dpos, params.position_buckets)
    return index


def check_shapes(q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, layout: AttentionLayout, params: AttentionParams) -> None:
    """Shape contract shared by the backends: a wrong call fails with the shapes it got."""
    n = layout.num_tokens
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention: q, k, v must be [rows, heads, dim], got {shapes}")
    if q.shape[0] != queries.num_queries or k.shape[0] != n or v.shape[0] != n:
        raise ValueError(
            f"attention: {queries.num_queries} queries and {n} tokens expected, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    heads, groups = q.shape[1], k.shape[1]
    if groups != params.num_kv_groups or v.shape[1] != groups or heads % groups != 0:
        raise ValueError(
            f"attention: {heads} query heads and {groups} key/value groups (expected G = {params.num_kv_groups} dividing H)"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: query width {q.shape[2]} != key width {k.shape[2]}")
    if params.bias is not None and params.bias.shape[0] != heads:
        raise ValueError(f"attention: the bias table has {params.bias.shape[0]} heads, queries have {heads}")


def empty_output(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Tensor:
    """``[0, H, dv]`` result for zero queries, still connected to the inputs' graph."""
    anchor = q.sum() + k.sum() + v.sum() + (params.bias.sum() if params.bias is not None else 0)
    return q.new_zeros((0, q.shape[1], v.shape[2])) + 0 * anchor
