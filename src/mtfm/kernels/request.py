"""Attention for one request: one user whose context (H and R) tokens come before its T-tokens.

This is the layout :func:`mtfm.data.aggregate.build_request` produces and serving scores. Under
MTFM's mask (:mod:`mtfm.model.mask`) a T-token is a key of no token but itself, so a query
attends to the ``C`` context keys (masked by the dynamic rule) plus, if it is a T-token, its own
key. Computed that way, a request of ``L`` candidates costs ``L x C`` scores instead of the
``(C + L)^2`` of a padded dense block, and -- what :mod:`mtfm.serve.export` needs -- every size
comes from a tensor shape: there is no padding to a data-dependent length, no ``nonzero`` and
no host sync, so ``torch.export`` traces it with symbolic sizes.

:func:`request_layout` builds the :class:`~mtfm.kernels.common.AttentionLayout` of such a
request with its query sets known from the shapes (``num_context`` set); the ``"request"``
backend (:func:`request_attention`) refuses any other layout. Its contract and its truth are
those of :func:`mtfm.kernels.reference.reference_attention` (``tests/test_export.py`` compares
them, forward and backward, on random requests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm.data.batch import NEVER, TOKEN_T
from mtfm.kernels.common import AttentionLayout, AttentionParams, QuerySet, bias_index, check_shapes, visible_rank_gap
from mtfm.model.mask import visible


def request_layout(token_type: Tensor, timestamps: Tensor, expiry: Tensor | None, num_context: int) -> AttentionLayout:
    """The attention layout of one request whose first ``num_context`` tokens are its context.

    The query sets (all tokens, the T-tokens, the context) are ranges, so they are cached here
    from the sizes instead of being found with ``nonzero`` as :class:`AttentionLayout` does for
    a batch. The order is checked here, once per request, eagerly (:func:`check_request_order`);
    under ``torch.export`` the host has checked it (:func:`mtfm.serve.export.request_inputs`).
    """
    if not torch.compiler.is_exporting():
        check_request_order(token_type, num_context)
    n = token_type.shape[0]
    device = token_type.device
    offsets = _range_offsets(n, device)
    everyone = torch.arange(n, device=device)
    layout = AttentionLayout(offsets, token_type, timestamps, torch.zeros_like(token_type),
                             expiry if expiry is not None else torch.full_like(timestamps, NEVER),
                             num_context=num_context)
    layout.cache[("queries", "all")] = QuerySet(everyone, offsets)
    layout.cache[("queries", "target")] = QuerySet(everyone[num_context:], _range_offsets(n - num_context, device))
    layout.cache[("context",)] = QuerySet(everyone[:num_context], _range_offsets(num_context, device))
    layout.cache[("context_then_target_inverse",)] = everyone  # context first already: the identity
    return layout


def _range_offsets(length: int, device) -> Tensor:
    """``[0, length]`` as a long tensor, built from a (possibly symbolic) size."""
    return torch.stack([torch.zeros((), dtype=torch.long, device=device),
                        torch.ones((), dtype=torch.long, device=device) * length])


def check_request_order(token_type: Tensor, num_context: int) -> None:
    """Eager check that the first ``num_context`` tokens are the context and the rest T-tokens."""
    is_t = token_type == TOKEN_T
    if bool(is_t[:num_context].any()) or not bool(is_t[num_context:].all()):
        raise ValueError(f"a request's layout must hold its {num_context} context tokens first, then only T-tokens")


def request_attention(
    q: Tensor, k: Tensor, v: Tensor, queries: QuerySet, layout: AttentionLayout, params: AttentionParams
) -> Tensor:
    """``[Nq, H, dv]`` attention of one request's queries (see the module docstring)."""
    check_shapes(q, k, v, queries, layout, params)
    c = layout.num_context
    if c is None or layout.offsets.shape[0] != 2:
        raise ValueError("the request backend scores one request: build its layout with mtfm.kernels.request.request_layout")
    nq, heads, _ = q.shape
    groups = k.shape[1]
    r = heads // groups
    idx = queries.index
    q_time = layout.timestamps.index_select(0, idx)
    k_type, k_time, k_expiry = layout.token_type[:c], layout.timestamps[:c], layout.expiry[:c]
    k_pos = torch.arange(c, device=q.device)
    mask = visible(q_time[:, None], idx[:, None], k_type[None, :], k_time[None, :], k_expiry[None, :], k_pos[None, :])

    # Context keys: head h = g * r + j reads group g, without repeating K or V.
    qg = q.reshape(nq, groups, r, q.shape[2])
    scores = torch.einsum("qgrd,kgd->grqk", qg, k[:c]) * params.alpha  # [G, r, Nq, C]
    if params.bias is not None:
        dpos = visible_rank_gap(mask, layout.positions().index_select(0, idx)) if params.position_buckets \
            else torch.zeros((), dtype=torch.long, device=q.device)
        index = bias_index(q_time[:, None] - k_time[None, :], dpos, params)
        scores = scores + params.bias[:, index].reshape(groups, r, nq, c)
    weights = torch.where(mask, F.silu(scores), torch.zeros_like(scores)) * params.norm
    out = torch.einsum("grqk,kgd->qgrd", weights, v[:c])

    # A T query's own key (time and position gap 0); a context query met its own among the context keys.
    own_k, own_v = k.index_select(0, idx), v.index_select(0, idx)
    own = (qg * own_k[:, :, None, :]).sum(-1) * params.alpha  # [Nq, G, r]
    if params.bias is not None:
        own = own + params.bias[:, 0].reshape(1, groups, r)  # gaps 0 and 0: bucket 0 of both, column 0 (bias_index)
    is_t = (layout.token_type.index_select(0, idx) == TOKEN_T)[:, None, None]
    own_weight = torch.where(is_t, F.silu(own), torch.zeros_like(own)) * params.norm
    out = out + own_weight[..., None] * own_v[:, :, None, :]
    return out.reshape(nq, heads, v.shape[2])
