"""OneTrans (Zhang et al. 2025, ByteDance, "OneTrans: Unified Feature Interaction and Sequence
Modeling with One Transformer in Industrial Recommender"), trained per scenario (the paper's
group 2 of baselines, section 4.1.2).

OneTrans's pieces, as implemented here:

* **one transformer over two kinds of tokens**: sequential (S) tokens from the user's
  behaviour sequences and non-sequential (NS) tokens from the request / candidate features,
  in the order ``[S; NS]``;
* **mixed parameterization**: all S tokens share one set of attention (QKV, output) and FFN
  weights; every NS token position has its *own* QKV, output, FFN and RMSNorm weights
  (:class:`TokenLinear`, :class:`TokenRMSNorm`);
* **causal attention**, standard softmax multi-head, **pre-norm with RMSNorm**, GELU FFN;
* **pyramid stack**: in layer ``l`` only the most recent S tokens issue queries (keys and values
  are still every token of the layer's input), and only the tokens that issued queries go on to
  the next layer, so the sequence shrinks layer by layer; in the last layer only the NS tokens
  issue queries;
* the NS tokens' final states (concatenated, after a final per-token RMSNorm) feed one tower
  (MLP and a linear logit) per task of the scenario.

**Adaptation to this library's data.** The user's behaviour rows are the S tokens: the history
(H) types and the real-time (R) types (``JaggedBatch.history`` / ``.realtime``), each type
tokenized by its **own MLP over its feature embeddings** (separate S-token *tokenizer*
parameters per sequence type; the output bias of each tokenizer acts as the type embedding, so
no extra type embedding or [SEP] token is added); after the tokenizers every S token goes
through the same shared transformer weights. Each user's S tokens are ordered like MTFM's
token layout (eq. 5): all H rows merged by time, then all R rows merged by time
(``batch.layout``, ties in schema order). Only the user's ``max_history`` most recent H rows
are kept (default 64 of the synthetic world's up to 2 x 64); R rows are not capped. The NS
tokens of an exposure are the scenario's user, cross and item features, one group per part
(parts without features left out), each group embedded and turned by its own MLP into
``ns_tokens_per_part`` tokens, in the order user, cross, item.

**Visibility.** An exposure only sees what MTFM's dynamic mask lets it see
(:mod:`mtfm.model.mask`): its NS tokens attend to every kept H token, to an R token only when
``t_k < t_q <= expiry_k``, and causally to the exposure's own NS tokens (each to the ones
before it and itself), never to another exposure's. S tokens never attend to NS tokens and are
causal among themselves (an H token sees the H tokens before it, an R token sees every H token
and the R tokens before it), so an R row at or after ``t_q`` can influence only S tokens later
than itself, none of which the exposure sees: nothing at or after the exposure's timestamp,
and no other exposure, changes its logits. (As in MTFM's full-attention layers, a visible R
token's state carries the earlier R rows it attended to, including ones that have already left
the exposure's own ``max_len`` view: all of them are strictly earlier than the exposure.)

**Pyramid schedule.** ``pyramid[l]`` is the number of H tokens issuing queries in layer ``l``:
the most recent ones, default linear from ``max_history`` in the first layer to 0 in the last
(``[64, 32, 0]`` for three layers). R tokens are the most recent part of the S sequence and
issue queries in every layer but the last; the last layer's queries are the NS tokens only.
Counting the pyramid in H tokens (rather than in S tokens of each exposure's view) is what
keeps the S computation shareable: the H rows are the same for all of a user's exposures.

**Efficiency (OneTrans's cross-request KV caching, as user-level aggregation).** Since S tokens
never attend to NS tokens, a user's S states (and the per-layer keys and values the NS tokens
read) are computed once per user and scenario and shared by all of that user's exposures in
the batch; each exposure's NS tokens then attend to those cached keys under its own
visibility mask. This equals computing every exposure alone, with its user's H rows and the R
rows strictly before it (``per_exposure_batch(batch, "past")``), up to float summation order
(tested). R rows at or after a user's latest exposure in the scenario are dropped before the
stack: nothing any of the user's exposures sees depends on them.

Trained per scenario (:class:`~mtfm.baselines.common.PerScenario`): one independent OneTrans,
with its own embedding tables, per scenario; only the users with an exposure in the scenario
are computed; the loss is the masked BCE summed over tasks (``task_mean``). Default size: MTFM
small's width (d 64, 2 heads, embeddings 16 / 4, tokenizer hidden [128]) with 3 layers, 2 NS
tokens per part, ``max_history`` 64. Measured on the 2,000-user synthetic world (CPU, batch 64):
one training step costs about 2.4x an MTFM-small step (4,096 vs 1,732 training exposures/s in
``mtfm train --max-steps 60``; 2.4-2.6x interleaved on the same batches, one thread), most of it
the NS-to-S attention of three per-scenario networks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtfm.baselines.common import SCENARIO_PARTS, BaselineOutput, PerScenario, mlp, row_samples
from mtfm.config import DataSchema
from mtfm.data.batch import TOKEN_H, TOKEN_R, JaggedBatch
from mtfm.model.embedding import FeatureEmbeddings
from mtfm.model.mtfm import embedding_fields

__all__ = ["OneTrans", "OneTransConfig", "BaselineOutput", "TokenLinear", "TokenRMSNorm", "SequenceState"]


class OneTransConfig(BaseModel):
    """Size of each scenario's OneTrans (defaults: MTFM small's width, 3 layers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_dim: int = Field(16, ge=1, description="width of each categorical feature's embedding")
    numeric_dim: int = Field(4, ge=1, description="width of each numeric feature's linear encoder")
    tokenizer_hidden: list[int] = Field(default_factory=lambda: [128],
                                        description="hidden widths of every S / NS tokenizer MLP")
    d_model: int = Field(64, ge=1, description="token width")
    num_heads: int = Field(2, ge=1, description="attention heads; must divide d_model")
    num_layers: int = Field(3, ge=1, description="transformer layers (the pyramid's height)")
    ffn_mult: int = Field(4, ge=1, description="FFN hidden width in units of d_model")
    ns_tokens_per_part: int = Field(2, ge=1, description="NS tokens made from each of user / cross / item")
    max_history: int = Field(64, ge=0, description="keep each user's most recent H rows only (R rows: all)")
    pyramid: list[int] | None = Field(None, description="H tokens issuing queries per layer, non-increasing, "
                                                        "last 0; default linear max_history -> 0")
    tower_hidden: list[int] = Field(default_factory=lambda: [32], description="hidden widths of each task tower")
    norm_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OneTransConfig":
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if any(w <= 0 for w in self.tokenizer_hidden + self.tower_hidden):
            raise ValueError("tokenizer_hidden and tower_hidden widths must be positive")
        if self.pyramid is not None:
            p = self.pyramid
            if len(p) != self.num_layers:
                raise ValueError(f"pyramid needs one entry per layer ({self.num_layers}), got {p}")
            if p[-1] != 0 or any(b > a for a, b in zip(p, p[1:])) or p[0] > self.max_history or min(p) < 0:
                raise ValueError(f"pyramid must be non-increasing from at most max_history ({self.max_history}) "
                                 f"to 0 in the last layer (only NS queries remain), got {p}")
        return self

    def history_queries(self) -> list[int]:
        """H tokens issuing queries in each layer (the most recent ones)."""
        if self.pyramid is not None:
            return list(self.pyramid)
        layers = self.num_layers
        if layers == 1:
            return [0]
        return [round(self.max_history * (layers - 1 - l) / (layers - 1)) for l in range(layers)]


# --------------------------------------------------------------------------------------------
# Token-specific parameters (the NS side of mixed parameterization)
# --------------------------------------------------------------------------------------------


class TokenLinear(nn.Module):
    """A separate ``Linear(in_dim, out_dim)`` per token position: ``[n, k, in] -> [n, k, out]``."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per token
        self.weight = nn.Parameter(torch.empty(num_tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tokens, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nki,kio->nko", x, self.weight) + self.bias


class TokenRMSNorm(nn.Module):
    """RMSNorm with a separate gain per token position (``[n, k, d]``)."""

    def __init__(self, num_tokens: int, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_tokens, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


# --------------------------------------------------------------------------------------------
# The state that flows through the stack
# --------------------------------------------------------------------------------------------


@dataclass
class SequenceState:
    """The S tokens of the ``U`` users of one scenario, padded per user.

    H tokens are right-aligned (the most recent in the last column, so "the most recent ``q``" is
    the last ``q`` columns for every user); R tokens are left-aligned in time order.
    """

    h: Tensor  # [U, Lh, d]
    h_valid: Tensor  # bool [U, Lh]
    h_time: Tensor  # long [U, Lh] (for inspection; padding 0)
    r: Tensor  # [U, Lr, d]
    r_valid: Tensor  # bool [U, Lr]
    r_time: Tensor  # long [U, Lr]
    r_expiry: Tensor  # long [U, Lr]

    def after_layer(self, h: Tensor, r: Tensor) -> "SequenceState":
        """The state after a layer whose queries were the last ``h.shape[1]`` H columns and every R
        token (``h``, ``r``: their outputs); the older H tokens leave the stack."""
        lh, keep = self.h.shape[1], h.shape[1]
        return SequenceState(h, self.h_valid[:, lh - keep:], self.h_time[:, lh - keep:], r,
                             self.r_valid, self.r_time, self.r_expiry)


@dataclass
class Exposures:
    """Where each exposure of the scenario sits: its user (``0..U-1``), its column in a per-user grid."""

    user: Tensor  # long [n]
    column: Tensor  # long [n]
    time: Tensor  # long [n]
    num_users: int
    width: int  # the most exposures of one user


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[..., L, d] -> [..., heads, L, d / heads]``."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, heads, dim // heads).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """``[..., heads, L, dh] -> [..., L, heads * dh]``."""
    x = x.transpose(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


def _to_grid(x: Tensor, ex: Exposures) -> Tensor:
    """Per-exposure rows ``[n, ...]`` into a per-user grid ``[U, E, ...]`` (zeros elsewhere)."""
    grid = x.new_zeros((ex.num_users * ex.width, *x.shape[1:]))
    return grid.index_copy(0, ex.user * ex.width + ex.column, x).view(ex.num_users, ex.width, *x.shape[1:])


def _from_grid(grid: Tensor, ex: Exposures) -> Tensor:
    """The inverse of :func:`_to_grid`: one row per exposure, ``[n, ...]``."""
    return grid.reshape(ex.num_users * ex.width, *grid.shape[2:]).index_select(0, ex.user * ex.width + ex.column)


class OneTransLayer(nn.Module):
    """One pre-norm transformer layer with shared S weights and per-token NS weights."""

    def __init__(self, d: int, heads: int, ffn: int, num_ns: int, eps: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(d // heads)
        self.s_norm1, self.s_norm2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.s_qkv, self.s_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.s_ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.ns_norm1, self.ns_norm2 = TokenRMSNorm(num_ns, d, eps), TokenRMSNorm(num_ns, d, eps)
        self.ns_qkv, self.ns_out = TokenLinear(num_ns, d, 3 * d), TokenLinear(num_ns, d, d)
        self.ns_ffn1, self.ns_ffn2 = TokenLinear(num_ns, d, ffn), TokenLinear(num_ns, ffn, d)
        causal = torch.tril(torch.ones(num_ns, num_ns, dtype=torch.bool))
        self.register_buffer("ns_causal", causal, persistent=False)

    def forward(self, s: SequenceState, ns: Tensor, ex: Exposures, keep_h: int | None) -> tuple[SequenceState, Tensor]:
        """``keep_h``: H tokens issuing queries (the most recent); None in the last layer (NS queries only)."""
        x = torch.cat([s.h, s.r], dim=1)  # [U, Ls, d]
        q, k, v = self.s_qkv(self.s_norm1(x)).chunk(3, dim=-1)
        ns = self._ns_update(ns, s, k, v, ex)  # k, v: the user's cached S keys and values
        if keep_h is None:
            return s, ns
        return self._s_update(s, x, q, k, v, keep_h), ns

    def _s_update(self, s: SequenceState, x: Tensor, q: Tensor, k: Tensor, v: Tensor, keep_h: int) -> SequenceState:
        """Causal attention among S tokens, queries from the last ``keep_h`` H tokens and every R token."""
        lh, ls = s.h.shape[1], x.shape[1]
        keep_h = min(keep_h, lh)
        if ls - (lh - keep_h) == 0:  # no S query in this layer (no R token, no H query)
            return s.after_layer(s.h[:, lh:], s.r)
        rows = torch.arange(lh - keep_h, ls, device=x.device)  # query positions
        cols = torch.arange(ls, device=x.device)
        key_valid = torch.cat([s.h_valid, s.r_valid], dim=1)  # [U, Ls]
        allowed = (cols[None, :] <= rows[:, None])[None] & key_valid[:, None, :]
        allowed = allowed | (cols[None, :] == rows[:, None])[None]  # padding queries see themselves: no NaN
        h = self.heads
        out = F.scaled_dot_product_attention(_heads(q[:, rows], h), _heads(k, h), _heads(v, h),
                                             attn_mask=allowed[:, None])
        y = x[:, rows] + self.s_out(_merge_heads(out))
        y = y + self.s_ffn(self.s_norm2(y))
        return s.after_layer(y[:, :keep_h], y[:, keep_h:])

    def _ns_update(self, ns: Tensor, s: SequenceState, k_s: Tensor, v_s: Tensor, ex: Exposures) -> Tensor:
        """Each exposure's NS tokens attend to its visible S keys and causally to its own NS tokens."""
        n, num_ns, d = ns.shape
        dh = d // self.heads
        q, k, v = self.ns_qkv(self.ns_norm1(ns)).chunk(3, dim=-1)  # [n, K, d]
        q = q * self.scale
        q_grid = _to_grid(q, ex).view(ex.num_users, ex.width * num_ns, d)
        hidden_s = ~_visible(s, ex)[:, None, :]  # [n, 1, Ls]
        hidden_ns = ~self.ns_causal
        heads = []
        for h in range(self.heads):  # one head at a time: no permute of the large score tensors
            cols = slice(h * dh, (h + 1) * dh)
            heads.append(_ns_head(q_grid[..., cols], q[..., cols], k[..., cols], v[..., cols],
                                  k_s[..., cols], v_s[..., cols], hidden_s, hidden_ns, ex))
        y = ns + self.ns_out(torch.cat(heads, dim=-1))
        return y + self.ns_ffn2(F.gelu(self.ns_ffn1(self.ns_norm2(y))))


def _ns_head(q_grid: Tensor, q: Tensor, k: Tensor, v: Tensor, k_s: Tensor, v_s: Tensor, hidden_s: Tensor,
             hidden_ns: Tensor, ex: Exposures) -> Tensor:
    """One head of the NS attention, ``[n, K, dh]``. The S part is one matmul per user over a grid
    of its exposures (all their queries against the user's cached keys); the scores then go back
    to one row per exposure for its own visibility mask and a softmax that also covers the
    exposure's own NS keys (causal)."""
    num_ns, ls = q.shape[1], k_s.shape[1]
    s_scores = _from_grid((q_grid @ k_s.transpose(1, 2)).view(ex.num_users, ex.width, num_ns, ls), ex)
    scores = torch.cat([s_scores.masked_fill(hidden_s, -math.inf),
                        (q @ k.transpose(1, 2)).masked_fill(hidden_ns, -math.inf)], dim=-1)
    p_s, p_ns = torch.softmax(scores, dim=-1).split([ls, num_ns], dim=-1)
    p_grid = _to_grid(p_s, ex).view(ex.num_users, ex.width * num_ns, ls)
    out_s = _from_grid((p_grid @ v_s).view(ex.num_users, ex.width, num_ns, -1), ex)
    return out_s + p_ns @ v


def _visible(s: SequenceState, ex: Exposures) -> Tensor:
    """``[n, Lh + Lr]``: which S tokens each exposure may see (every kept H; R iff ``t_k < t_q <= expiry_k``)."""
    t = ex.time[:, None]
    r_ok = s.r_valid[ex.user] & (s.r_time[ex.user] < t) & (t <= s.r_expiry[ex.user])
    return torch.cat([s.h_valid[ex.user], r_ok], dim=1)


# --------------------------------------------------------------------------------------------
# Tokenizers and one scenario's model
# --------------------------------------------------------------------------------------------


def _tokenizer(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    """Feature embeddings -> token(s): ``Linear -> ReLU`` per hidden width, then a linear map."""
    body = mlp(in_dim, hidden)
    return nn.Sequential(*body, nn.Linear(hidden[-1] if hidden else in_dim, out_dim))


def _padded(values: Tensor, user: Tensor, column: Tensor, num_users: int, width: int, fill: int = 0) -> Tensor:
    """Rows ``values[i]`` placed at ``[user[i], column[i]]`` of a ``[U, width, ...]`` tensor."""
    out = values.new_full((num_users * width, *values.shape[1:]), fill)
    return out.index_copy(0, user * width + column, values).view(num_users, width, *values.shape[1:])


class ScenarioOneTrans(nn.Module):
    """One scenario's OneTrans; ``forward(batch)`` gives its ``[n_s, num_tasks]`` logits."""

    def __init__(self, schema: DataSchema, scenario: str, config: OneTransConfig) -> None:
        super().__init__()
        self.scenario, self.config = scenario, config
        d, hidden = config.d_model, config.tokenizer_hidden
        fields = {f: feats for f, feats in embedding_fields(schema).items()
                  if f.startswith(("H:", "R:")) or f.startswith(f"T:{scenario}:")}
        self.embeddings = FeatureEmbeddings(fields, config.embedding_dim, config.numeric_dim)
        # S fields in token-group order (history types, then real-time types): group id = position.
        self.s_fields = [f"H:{s.name}" for s in schema.history] + [f"R:{s.name}" for s in schema.realtime]
        self.s_names = [(False, s.name) for s in schema.history] + [(True, s.name) for s in schema.realtime]
        self.s_tokenizers = nn.ModuleList([_tokenizer(self.embeddings.out_dim(f), hidden, d) for f in self.s_fields])
        self.ns_parts = [p for p in SCENARIO_PARTS if f"T:{scenario}:{p}" in fields]
        self.ns_tokenizers = nn.ModuleDict({
            p: _tokenizer(self.embeddings.out_dim(f"T:{scenario}:{p}"), hidden, config.ns_tokens_per_part * d)
            for p in self.ns_parts})
        self.num_ns = config.ns_tokens_per_part * len(self.ns_parts)
        self.history_queries = config.history_queries()
        self.layers = nn.ModuleList([OneTransLayer(d, config.num_heads, config.ffn_mult * d, self.num_ns,
                                                   config.norm_eps) for _ in range(config.num_layers)])
        self.final_norm = TokenRMSNorm(self.num_ns, d, config.norm_eps)
        tower_in = config.tower_hidden[-1] if config.tower_hidden else self.num_ns * d
        self.towers = nn.ModuleList([nn.Sequential(*mlp(self.num_ns * d, config.tower_hidden), nn.Linear(tower_in, 1))
                                     for _ in schema.scenario(scenario).tasks])

    def forward(self, batch: JaggedBatch) -> Tensor:
        ns = self.ns_states(batch)
        if ns is None:
            return next(self.parameters()).new_zeros((0, len(self.towers)))
        flat = ns.flatten(1)
        return torch.cat([tower(flat) for tower in self.towers], dim=1)

    def ns_states(self, batch: JaggedBatch) -> Tensor | None:
        """``[n_s, K, d]``: every exposure's NS tokens after the stack and the final norm (None: no exposure)."""
        states = self.encode(batch)
        if states is None:
            return None
        s, ns, ex = states
        for layer, keep in zip(self.layers, self.layer_queries()):
            s, ns = layer(s, ns, ex, keep)
        return self.final_norm(ns)

    def layer_queries(self) -> list[int | None]:
        """Per layer: H tokens issuing queries, None for the last (NS queries only)."""
        return [*self.history_queries[:-1], None]

    def sequence_states(self, batch: JaggedBatch) -> list[SequenceState]:
        """The S state entering each layer (for inspecting the pyramid); [] when no exposure."""
        states = self.encode(batch)
        if states is None:
            return []
        s, ns, ex = states
        out = []
        for layer, keep in zip(self.layers, self.layer_queries()):
            out.append(s)
            s, ns = layer(s, ns, ex, keep)
        return out

    def encode(self, batch: JaggedBatch) -> tuple[SequenceState, Tensor, Exposures] | None:
        """Tokens of the users with an exposure in this scenario: their S state, the NS tokens
        ``[n, K, d]`` and where each exposure sits; None when the scenario has no exposure."""
        sc = batch.scenarios[self.scenario]
        if sc.num_rows == 0:
            return None
        counts = sc.offsets[1:] - sc.offsets[:-1]
        users = torch.nonzero(counts > 0).flatten()
        compact = torch.full((batch.batch_size,), -1, dtype=torch.long, device=counts.device)
        compact[users] = torch.arange(users.shape[0], device=counts.device)
        row_user = row_samples(sc.offsets)
        ex = Exposures(compact[row_user], torch.arange(sc.num_rows, device=counts.device) - sc.offsets[row_user],
                       sc.timestamps.long(), int(users.shape[0]), int(counts.max()))
        last_exposure = torch.zeros(batch.batch_size, dtype=torch.long, device=counts.device)
        last_exposure = last_exposure.scatter_reduce(0, row_user, ex.time, reduce="amax", include_self=False)
        return self._sequence_state(batch, compact, last_exposure, ex.num_users), self._ns_tokens(batch), ex

    def _ns_tokens(self, batch: JaggedBatch) -> Tensor:
        sc = batch.scenarios[self.scenario]
        parts = []
        for p in self.ns_parts:
            emb = self.embeddings.embed(f"T:{self.scenario}:{p}", getattr(sc, p), sc.num_rows)
            parts.append(self.ns_tokenizers[p](emb).view(sc.num_rows, self.config.ns_tokens_per_part, -1))
        return torch.cat(parts, dim=1)

    def _sequence_state(self, batch: JaggedBatch, compact: Tensor, last_exposure: Tensor,
                        num_users: int) -> SequenceState:
        """S tokens of the selected users from ``batch.layout`` (H merged by time, then R merged by time)."""
        lay = batch.layout
        token_user = row_samples(lay.offsets)
        keep = compact[token_user] >= 0
        is_h = keep & (lay.token_type == TOKEN_H)
        # R rows at or after the user's latest exposure here: seen by none of its exposures, and
        # (causal) they only reach later R tokens, which none sees either.
        is_r = keep & (lay.token_type == TOKEN_R) & (lay.timestamps < last_exposure[token_user])
        h_tok, r_tok = torch.nonzero(is_h).flatten(), torch.nonzero(is_r).flatten()
        h_user, r_user = compact[token_user[h_tok]], compact[token_user[r_tok]]
        # H: the most recent max_history per user, right-aligned.
        h_from_end = _rank_from_end(h_user, num_users)
        recent = h_from_end < self.config.max_history
        h_tok, h_user, h_from_end = h_tok[recent], h_user[recent], h_from_end[recent]
        lh = int(h_from_end.max()) + 1 if h_tok.numel() else 0
        h_col = lh - 1 - h_from_end
        r_col = _rank_from_start(r_user, num_users)
        lr = int(r_col.max()) + 1 if r_tok.numel() else 0
        h = _padded(self._tokens(batch, h_tok), h_user, h_col, num_users, lh)
        r = _padded(self._tokens(batch, r_tok), r_user, r_col, num_users, lr)
        ones_h, ones_r = torch.ones_like(h_tok, dtype=torch.bool), torch.ones_like(r_tok, dtype=torch.bool)
        if lay.expiry is None and r_tok.numel():
            raise ValueError("a batch with real-time rows must carry their expiry (the loader computes it)")
        r_expiry = lay.expiry[r_tok] if lay.expiry is not None else lay.timestamps[r_tok]
        def pad_h(x: Tensor) -> Tensor:
            return _padded(x, h_user, h_col, num_users, lh)

        def pad_r(x: Tensor) -> Tensor:
            return _padded(x, r_user, r_col, num_users, lr)

        return SequenceState(h, pad_h(ones_h), pad_h(lay.timestamps[h_tok]),
                             r, pad_r(ones_r), pad_r(lay.timestamps[r_tok]), pad_r(r_expiry))

    def _tokens(self, batch: JaggedBatch, tokens: Tensor) -> Tensor:
        """``[len(tokens), d]``: layout tokens ``tokens`` (H or R) through their type's tokenizer."""
        lay = batch.layout
        groups, rows = lay.group_ids[tokens], lay.source_row[tokens]
        out = None
        for g, (field, (realtime, name)) in enumerate(zip(self.s_fields, self.s_names)):
            mine = torch.nonzero(groups == g).flatten()
            if mine.numel() == 0:
                continue
            seq = (batch.realtime if realtime else batch.history)[name]
            emb = self.embeddings.embed(field, seq.features, seq.num_rows).index_select(0, rows[mine])
            tok = self.s_tokenizers[g](emb)
            out = tok.new_zeros((tokens.shape[0], tok.shape[1])) if out is None else out
            out = out.index_copy(0, mine, tok)
        if out is None:
            weight = self.s_tokenizers[0][-1].weight if len(self.s_tokenizers) else self.final_norm.weight
            return weight.new_zeros((0, self.config.d_model))
        return out


def _rank_from_start(user: Tensor, num_users: int) -> Tensor:
    """Position of each row within its user's rows (rows grouped by user, in order)."""
    counts = torch.bincount(user, minlength=num_users)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(user.shape[0], device=user.device) - starts[user]


def _rank_from_end(user: Tensor, num_users: int) -> Tensor:
    """How many of its user's rows come after each row (0: the user's most recent)."""
    counts = torch.bincount(user, minlength=num_users)
    return counts[user] - 1 - _rank_from_start(user, num_users)


class OneTrans(PerScenario):
    """OneTrans per scenario: ``model(batch).logits[s]`` ``[n_s, num_tasks]``; ``model.loss(batch, out)``."""

    def __init__(self, schema: DataSchema, config: OneTransConfig | None = None) -> None:
        cfg = config or OneTransConfig()
        super().__init__(schema, lambda sch, name: ScenarioOneTrans(sch, name, cfg))
        self.config = cfg
