"""Building blocks: MLP, Group LayerNorm, and the full / target HSTU attention layers with GQA.

Full attention layer (paper eq. 6-10), over all N tokens of every user::

    X~ = GLN(X);  U, Q_1..Q_H, K_1..K_G, V_1..V_G = split(SiLU(f1(X~)))
    A_h = SiLU(alpha Q_h K_g(h)^T + bias) * M / n  V_g(h)
    X' = f2(GLN(A) * U) + X

Target attention layer (eq. 11-18): the same, but only T-tokens are queried and updated:
``U_T, Q_T`` come from the T rows (``f_uq``), keys and values from *all* tokens (``f_kv``), and
non-T tokens pass through unchanged. The paper's eq. 14 writes ``X~_T`` as the input of
``f_kv``, but its mask ``M_T = M[L_H + L_R:]`` has N columns and a T-token may only see
itself among the T-tokens, so keys restricted to T-tokens would make the layer a per-token
MLP. We read eq. 14 as a typo: keys and values cover all tokens (``X~``).

Every layer can be narrowed to a subset of token groups (:meth:`subset`) for a scenario
subgraph: the narrowed layer shares all weights and only holds the LayerNorm parameters of the
groups it keeps.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.kernels.common import log_buckets
from mtfm.kernels import AttentionLayout, AttentionParams, fused_gln_available, fused_group_layer_norm, hstu_attention
from mtfm.model.config import ModelConfig
from mtfm.model.content import append_content
from mtfm.model.embedding import module_key

if TYPE_CHECKING:
    from mtfm.model.hta import TokenGroups


class MLP(nn.Sequential):
    """``Linear -> SiLU -> Dropout`` per hidden width, then a final ``Linear`` to ``out_dim``."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter and submodule (its own registries, so
    replacing a submodule on the copy leaves the original intact)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class GroupLayerNorm(nn.Module):
    """LayerNorm whose scale and shift are chosen per token by its group (paper eq. 6).

    Each group owns its own parameters (one ``[dim]`` weight and bias per group name), so a
    subset of groups can be shared into a subgraph without carrying the others.
    ``group_ids`` index the module's own group order (``self.groups``).
    """

    def __init__(self, groups: list[str], dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.groups = list(groups)
        self.dim, self.eps = dim, eps
        self.weight = nn.ParameterDict({module_key(g): nn.Parameter(torch.ones(dim)) for g in self.groups})
        self.bias = nn.ParameterDict({module_key(g): nn.Parameter(torch.zeros(dim)) for g in self.groups})

    def affine(self) -> tuple[Tensor, Tensor]:
        """``[num_groups, dim]`` scale and shift, rows in ``self.groups`` order."""
        keys = [module_key(g) for g in self.groups]
        return torch.stack([self.weight[k] for k in keys]), torch.stack([self.bias[k] for k in keys])

    def normalize(self, x: Tensor) -> Tensor:
        """The group-independent part: zero mean, unit variance per row."""
        return F.layer_norm(x, (self.dim,), eps=self.eps)

    def forward(self, x: Tensor, group_ids: Tensor) -> Tensor:
        if fused_gln_available(x):  # GPU: one fused Triton pass (mtfm.kernels.triton_gln); this method is its reference
            weight, bias = self.affine()
            return fused_group_layer_norm(x, group_ids, weight, bias, self.eps)
        # index_select, not ``weight[group_ids]``: its backward is an index_add, while the
        # backward of advanced indexing (index_put with accumulate) is ~100x slower on CPU
        # when many rows share few groups.
        weight, bias = self.affine()
        return self.normalize(x) * weight.index_select(0, group_ids) + bias.index_select(0, group_ids)

    def subset(self, groups: list[str]) -> "GroupLayerNorm":
        """A GLN over ``groups`` (in that order) sharing their parameters with this one."""
        missing = [g for g in groups if g not in self.groups]
        if missing:
            raise KeyError(f"GroupLayerNorm has no groups {missing}; it has {self.groups}")
        new = GroupLayerNorm.__new__(GroupLayerNorm)
        nn.Module.__init__(new)
        new.groups, new.dim, new.eps = list(groups), self.dim, self.eps
        new.weight = nn.ParameterDict({module_key(g): self.weight[module_key(g)] for g in groups})
        new.bias = nn.ParameterDict({module_key(g): self.bias[module_key(g)] for g in groups})
        return new


def _attention_params(config: ModelConfig, time_bias: Tensor | None, position_bias: Tensor | None) -> AttentionParams:
    """The attention constants; time and position biases become one ``[H, T * P]`` table (their outer sum)."""
    if time_bias is not None and position_bias is not None:
        table = (time_bias[:, :, None] + position_bias[:, None, :]).flatten(1)
    else:
        table = time_bias if time_bias is not None else position_bias
    return AttentionParams(
        alpha=config.alpha,
        norm=1.0 / config.attention_norm_len,
        num_kv_groups=config.num_kv_groups,
        bias=table,
        time_buckets=config.time_bias_buckets if time_bias is not None else 0,
        position_buckets=config.position_bias_buckets if position_bias is not None else 0,
        padding_slack=config.jagged_padding_slack,
    )


HORIZON_DECAY = 3.0  # bias per log2 bucket beyond a head's horizon (horizons init): 2 buckets past it, SiLU ~ 0


def _initial_time_bias(config: ModelConfig) -> Tensor:
    """``[heads, buckets]`` initial time bias (``config.time_bias_init``)."""
    heads, buckets = config.num_heads, config.time_bias_buckets
    bias = torch.zeros(heads, buckets)
    if config.time_bias_init == "horizons" and heads > 1:
        shortest = float(log_buckets(torch.tensor([config.time_bias_shortest_horizon_s]).long(), buckets))
        horizons = torch.linspace(buckets - 1, shortest, heads)
        beyond = torch.arange(buckets, dtype=torch.float32)[None, :] - horizons[:, None]
        bias -= HORIZON_DECAY * beyond.clamp(min=0)
    bias[:, 0] = config.time_bias_self_init
    return bias


class _HSTULayer(nn.Module):
    """What full and target layers share: sizes, output projection, attention call."""

    def __init__(
        self, config: ModelConfig, groups: list[str], output_groups: list[str], link_widths: list[int] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.link_widths = list(link_widths or [])
        heads, kv, dh = config.num_heads, config.num_kv_groups, config.dim_per_head
        self.heads, self.kv_groups, self.dh = heads, kv, dh
        self.gln_in = GroupLayerNorm(groups, config.d_model, config.layer_norm_eps)
        self.gln_attn = GroupLayerNorm(output_groups, heads * dh, config.layer_norm_eps)
        self.f2 = nn.Linear(heads * dh, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.time_bias = nn.Parameter(_initial_time_bias(config)) if config.relative_time_bias else None
        self.position_bias = (
            nn.Parameter(torch.zeros(heads, config.position_bias_buckets)) if config.relative_position_bias else None
        )
        self.match_scale = (
            nn.Parameter(torch.full((heads, len(self.link_widths)), config.content_match_init))
            if self.link_widths else None
        )
        # the link table of each column of the content vector (a buffer: it follows the layer's device)
        link_of_column = [i for i, width in enumerate(self.link_widths) for _ in range(width)]
        self.register_buffer("_link_of_column", torch.tensor(link_of_column, dtype=torch.long), persistent=False)

    def _split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        k, v = kv.split(self.kv_groups * self.dh, dim=-1)
        n = kv.shape[0]  # explicit row counts, not -1: a symbolic size stays free of "!= 0" guards under torch.export
        return k.reshape(n, self.kv_groups, self.dh), v.reshape(n, self.kv_groups, self.dh)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, queries, layout: AttentionLayout) -> Tensor:
        params = _attention_params(self.config, self.time_bias, self.position_bias)
        q = q.reshape(q.shape[0], self.heads, self.dh)
        if self.match_scale is not None:
            weight = self.match_scale.index_select(1, self._link_of_column) / params.alpha  # [H, W]
            q, k = append_content(q, k, layout, queries.index, weight)
        a = hstu_attention(q, k, v, queries, layout, params, self.config.attention_backend)
        return a.reshape(a.shape[0], self.heads * self.dh)

    def _output(self, x: Tensor, a: Tensor, u: Tensor, out_groups: Tensor) -> Tensor:
        """Eq. 10 / 17: ``f2(GLN(A) * U) + X``."""
        return x + self.dropout(self.f2(self.gln_attn(a, out_groups) * u))


class FullAttentionLayer(_HSTULayer):
    """HSTU attention with GQA over all tokens (eq. 7-10).

    With ``target_groups`` the layer is the last of the stack and *pruned*: its non-T outputs
    would reach nothing, so only the T rows are queried and updated (keys and values still
    come from all tokens) and its output GLN only holds the T groups. On the T rows this is
    exactly the unpruned layer; the other rows are returned unchanged.
    """

    def __init__(
        self, config: ModelConfig, groups: list[str], target_groups: list[str] | None = None,
        link_widths: list[int] | None = None,
    ) -> None:
        self.pruned = target_groups is not None
        super().__init__(config, groups, target_groups if target_groups is not None else groups, link_widths)
        width = self.heads * self.dh
        self.f1 = nn.Linear(config.d_model, 2 * width + 2 * self.kv_groups * self.dh)

    def forward(self, x: Tensor, groups: "TokenGroups", layout: AttentionLayout) -> Tensor:
        width = self.heads * self.dh
        xn = self.gln_in(x, groups.all)
        if not self.pruned:
            u, q, kv = F.silu(self.f1(xn)).split([width, width, 2 * self.kv_groups * self.dh], dim=-1)
            k, v = self._split_kv(kv)
            a = self._attend(q, k, v, layout.queries("all"), layout)
            return self._output(x, a, u, groups.all)
        targets = layout.queries("target").index
        u, q = self.project_uq(xn.index_select(0, targets))
        k, v = self.project_kv(xn)
        a = self._attend(q, k, v, layout.queries("target"), layout)
        x_t = self._output(x.index_select(0, targets), a, u, groups.target)
        return x.index_copy(0, targets, x_t.to(x.dtype))

    def project_uq(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """``(U, Q)`` of normalised rows: the first part of ``f1`` only (rows that are queried)."""
        width = self.heads * self.dh
        w, b = self.f1.weight, self.f1.bias
        return F.silu(F.linear(xn, w[: 2 * width], b[: 2 * width])).split([width, width], dim=-1)

    def project_kv(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of normalised rows: the last part of ``f1`` only."""
        width = self.heads * self.dh
        w, b = self.f1.weight, self.f1.bias
        return self._split_kv(F.silu(F.linear(xn, w[2 * width :], b[2 * width :])))

    def subset(self, groups: list[str], target_groups: list[str]) -> "FullAttentionLayer":
        new = shallow_copy(self)
        new.gln_in = self.gln_in.subset(groups)
        new.gln_attn = self.gln_attn.subset(target_groups if self.pruned else groups)
        return new


class TargetAttentionLayer(_HSTULayer):
    """HSTU attention with GQA that queries and updates only T-tokens (eq. 11-18).

    ``gln_in`` covers every group (keys and values come from all tokens); ``gln_attn`` only
    the T groups (only T rows are updated).
    """

    def __init__(
        self, config: ModelConfig, groups: list[str], target_groups: list[str], link_widths: list[int] | None = None
    ) -> None:
        super().__init__(config, groups, target_groups, link_widths)
        width = self.heads * self.dh
        self.f_uq = nn.Linear(config.d_model, 2 * width)
        self.f_kv = nn.Linear(config.d_model, 2 * self.kv_groups * self.dh)

    def project_uq(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """``(U_T, Q_T)`` of normalised T rows (eq. 12-13)."""
        width = self.heads * self.dh
        return F.silu(self.f_uq(xn)).split([width, width], dim=-1)

    def project_kv(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of normalised rows (eq. 14)."""
        return self._split_kv(F.silu(self.f_kv(xn)))

    def context_kv(self, x_ctx: Tensor, ctx_groups: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the non-T tokens (eq. 14 over the context rows), one layer at a time."""
        return self.project_kv(self.gln_in(x_ctx, ctx_groups))

    def forward(
        self,
        x_t: Tensor,
        t_groups: Tensor,
        t_out_groups: Tensor,
        k_ctx: Tensor,
        v_ctx: Tensor,
        layout: AttentionLayout,
    ) -> Tensor:
        """New T rows ``[L_T, d]`` from the T rows and the (precomputed) context keys/values.

        ``t_groups`` index ``gln_in``'s groups, ``t_out_groups`` index ``gln_attn``'s (T only).
        """
        xn = self.gln_in(x_t, t_groups)
        u, q = self.project_uq(xn)
        k_t, v_t = self.project_kv(xn)
        k = _in_token_order(layout, k_ctx, k_t)
        v = _in_token_order(layout, v_ctx, v_t)
        a = self._attend(q, k, v, layout.queries("target"), layout)
        return self._output(x_t, a, u, t_out_groups)

    def subset(self, groups: list[str], target_groups: list[str]) -> "TargetAttentionLayer":
        new = shallow_copy(self)
        new.gln_in, new.gln_attn = self.gln_in.subset(groups), self.gln_attn.subset(target_groups)
        return new


def _in_token_order(layout: AttentionLayout, ctx_rows: Tensor, target_rows: Tensor) -> Tensor:
    """The context tokens' rows and the T-tokens' rows, placed at their flat token positions.

    One concatenation and one gather (by the inverse of "context first, then targets", cached
    per batch). Scattering both parts into a zero-filled ``[N, ...]`` tensor computes the same
    rows with a fill and two full copies forward, and more work backward.
    """
    key = ("context_then_target_inverse",)
    if key not in layout.cache:
        order = torch.cat([layout.context().index, layout.queries("target").index])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        layout.cache[key] = inverse
    return torch.cat([ctx_rows, target_rows.to(ctx_rows.dtype)]).index_select(0, layout.cache[key])


def fused_context_kv(layers: list[TargetAttentionLayer], x_ctx: Tensor, ctx_groups: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Non-T keys/values of all K target layers of a block at once.

    The K layers see the same non-T tokens (target layers never change them), so the
    LayerNorm statistics are computed once and the K projections run as one batched matmul
    (``baddbmm`` over the layers' stacked ``f_kv`` weights, each applied to the rows after its
    own group affine). Equal to ``[layer.context_kv(x_ctx, ctx_groups) for layer in layers]``.
    """
    if not layers:
        return []
    xhat = layers[0].gln_in.normalize(x_ctx)  # same eps and width in every layer
    affines = [layer.gln_in.affine() for layer in layers]
    scale = torch.stack([w.index_select(0, ctx_groups) for w, _ in affines])  # [K, n, d]
    shift = torch.stack([b.index_select(0, ctx_groups) for _, b in affines])
    weight = torch.stack([layer.f_kv.weight.t() for layer in layers])  # [K, d, 2 G dh]
    bias = torch.stack([layer.f_kv.bias for layer in layers])[:, None, :]  # [K, 1, 2 G dh]
    kv = F.silu(torch.baddbmm(bias, xhat[None] * scale + shift, weight))
    return [layer._split_kv(kv[i]) for i, layer in enumerate(layers)]
