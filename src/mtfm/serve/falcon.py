"""M-Falcon: score a request's candidates in micro-batches over a cached user prefix (paper 3.3.3).

Under MTFM's dynamic mask no token attends to a T-token (a T-token sees only the context and
itself), so everything the user's context tokens (H and R) compute -- their states after every
layer, and every layer's keys and values of them -- is independent of the candidates. A request
(one user, one scenario, N candidates; :func:`mtfm.data.aggregate.build_request`) is therefore
scored in two steps:

1. :func:`compute_prefix` runs the stack on the context tokens alone, once, and keeps each
   attention layer's context keys and values (:class:`UserPrefix`);
2. :func:`score_candidates` runs only the T-token work, ``micro_batch`` candidates at a time:
   every layer queries the candidates' rows against the cached context keys/values plus
   each candidate's own key, then the final norm and the MMoE heads.

The result equals one forward pass over the whole request, and scoring each candidate alone
(``tests/test_falcon.py``), to float rounding. The prefix is what a per-user cache would keep
between requests (:attr:`UserPrefix.nbytes` says what it costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.data.batch import JaggedBatch
from mtfm.kernels import AttentionLayout
from mtfm.model.batch_ops import take_candidates
from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer
from mtfm.model.mtfm import MTFMBase


@dataclass
class UserPrefix:
    """One user's context tokens as every layer of the stack sees them.

    ``kv[i]``: context keys and values ``([C, G, dh], [C, G, dh])`` of the i-th attention layer
    in stack order (target and full layers alike). ``token_type``, ``timestamps``, ``expiry``:
    the context tokens' mask attributes, in layout order.
    """

    kv: list[tuple[Tensor, Tensor]]
    token_type: Tensor
    timestamps: Tensor
    expiry: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_type.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


@dataclass
class _Request:
    """A one-user request split into its context rows and its candidate (T) rows."""

    x: Tensor  # [N, d] tokenizer outputs, layout order
    groups_all: Tensor  # [N] group ids (model order)
    ctx: Tensor  # [C] flat positions of the context tokens (they come first in the layout)
    tgt: Tensor  # [L] flat positions of the T-tokens
    target_groups: Tensor  # [L] index into the T-only norms
    layout: AttentionLayout


def _layers(model: MTFMBase) -> list[TargetAttentionLayer | FullAttentionLayer]:
    return [layer for block in model.stack.blocks for layer in (*block.targets, *block.fulls)]


def _check_one_user(batch: JaggedBatch) -> None:
    if batch.batch_size != 1:
        raise ValueError(f"M-Falcon scores one request (one user) at a time; the batch holds {batch.batch_size} users")


def _split_request(model: MTFMBase, batch: JaggedBatch) -> _Request:
    _check_one_user(batch)
    layout = model.attention_layout(batch)
    groups = model._token_groups(batch, layout)
    x = model._tokens(batch)
    ctx, tgt = layout.context().index, layout.queries("target").index
    if ctx.numel() and tgt.numel() and int(ctx.max()) > int(tgt.min()):
        raise ValueError("token layout: context tokens must come before the T-tokens (H; R; T)")
    return _Request(x, groups.all, ctx, tgt, groups.target, layout)


def _context_layout(req: _Request) -> AttentionLayout:
    ctx = req.ctx
    lay = req.layout
    offsets = torch.tensor([0, ctx.numel()], dtype=torch.long, device=ctx.device)
    content = lay.content.index_select(0, ctx) if lay.content is not None else None
    return AttentionLayout(offsets, lay.token_type[ctx], lay.timestamps[ctx], torch.zeros_like(ctx), lay.expiry[ctx],
                           content)


@torch.no_grad()
def compute_prefix(model: MTFMBase, batch: JaggedBatch) -> UserPrefix:
    """Run the stack over the request's context tokens once; keep every layer's keys/values.

    Only the context is tokenized: the request is first cut to no candidates."""
    _check_one_user(batch)
    first = next(iter(batch.scenarios))
    req = _split_request(model, take_candidates(batch, first, torch.zeros(0, dtype=torch.long)))
    layout = _context_layout(req)
    everyone = layout.queries("all")
    x, groups = req.x.index_select(0, req.ctx), req.groups_all.index_select(0, req.ctx)
    kv: list[tuple[Tensor, Tensor]] = []
    for layer in _layers(model):
        xn = layer.gln_in(x, groups)
        k, v = layer.project_kv(xn)
        kv.append((k, v))
        if isinstance(layer, FullAttentionLayer) and not layer.pruned:  # only full layers change context rows
            u, q = layer.project_uq(xn)
            a = layer._attend(q, k, v, everyone, layout)
            x = layer._output(x, a, u, groups)
    return UserPrefix(kv, layout.token_type, layout.timestamps, layout.expiry)


def _candidate_layout(prefix: UserPrefix, req: _Request, rows: Tensor) -> AttentionLayout:
    """Context tokens followed by the chosen T-tokens, as one user."""
    lay = req.layout
    tgt = req.tgt.index_select(0, rows)
    n = prefix.num_tokens + rows.numel()
    offsets = torch.tensor([0, n], dtype=torch.long, device=rows.device)
    content = None
    if lay.content is not None:  # the request's own context rows: the prefix was built from the same context
        content = torch.cat([lay.content.index_select(0, req.ctx), lay.content.index_select(0, tgt)])
    return AttentionLayout(
        offsets,
        torch.cat([prefix.token_type, lay.token_type[tgt]]),
        torch.cat([prefix.timestamps, lay.timestamps[tgt]]),
        torch.zeros(n, dtype=torch.long, device=rows.device),
        torch.cat([prefix.expiry, lay.expiry[tgt]]),
        content,
    )


@torch.no_grad()
def _score_rows(model: MTFMBase, prefix: UserPrefix, req: _Request, rows: Tensor) -> Tensor:
    """Final T-token embeddings ``[len(rows), d]`` of the candidates ``rows`` (indices into req.tgt)."""
    layout = _candidate_layout(prefix, req, rows)
    targets = layout.queries("target")
    tgt = req.tgt.index_select(0, rows)
    x_t, g_all, g_t = req.x.index_select(0, tgt), req.groups_all.index_select(0, tgt), req.target_groups.index_select(0, rows)
    for layer, (k_ctx, v_ctx) in zip(_layers(model), prefix.kv):
        xn = layer.gln_in(x_t, g_all)
        u, q = layer.project_uq(xn)
        k_t, v_t = layer.project_kv(xn)
        k, v = torch.cat([k_ctx, k_t.to(k_ctx.dtype)]), torch.cat([v_ctx, v_t.to(v_ctx.dtype)])
        a = layer._attend(q, k, v, targets, layout)
        out_groups = g_all if isinstance(layer, FullAttentionLayer) and not layer.pruned else g_t
        x_t = layer._output(x_t, a, u, out_groups)
    if model.final_norm is not None:
        x_t = model.final_norm(x_t, g_t)
    return x_t


@torch.no_grad()
def score_candidates(model: MTFMBase, batch: JaggedBatch, prefix: UserPrefix | None = None,
                     micro_batch: int | None = None) -> dict[str, Tensor]:
    """Logits ``{scenario: [n_s, tasks]}`` of a one-user request, ``micro_batch`` candidates at a
    time (None: all at once) over the cached ``prefix`` (computed here when not given)."""
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    prefix = prefix if prefix is not None else compute_prefix(model, batch)
    req = _split_request(model, batch)
    if prefix.num_tokens != req.ctx.numel():
        raise ValueError(f"the prefix holds {prefix.num_tokens} context tokens, the request {req.ctx.numel()}")
    total = req.tgt.numel()
    step = total if micro_batch is None else micro_batch
    parts = [_score_rows(model, prefix, req, torch.arange(s, min(total, s + step), device=req.tgt.device))
             for s in range(0, total, max(step, 1))]
    x_t = torch.cat(parts) if parts else req.x.new_zeros((0, req.x.shape[1]))
    rows = batch.layout.source_row[req.tgt]
    logits: dict[str, Tensor] = {}
    for name, scenario in batch.scenarios.items():
        local = model.target_groups.index(f"T:{name}")
        sel = torch.nonzero(req.target_groups == local).flatten()
        emb = x_t.new_zeros((scenario.num_rows, x_t.shape[1])).index_copy(0, rows[sel], x_t.index_select(0, sel))
        out = model.head(emb, name)
        logits[name] = out if out.dtype == torch.float64 else out.float()
    return logits


__all__ = ["UserPrefix", "compute_prefix", "score_candidates"]
