"""The Hybrid Target Attention stack ``(K:P)xB`` (paper section 3.2.2).

Each of the B blocks runs K target-attention layers (T-tokens only) and then P full-attention
layers (all tokens); the paper uses P = 1 and the ablation configurations (0:16)x1 (full
only), (16:0)x1 (target only), (1:1)x8, (3:1)x4 and (5:1)x3 are all expressible.

Within a block, the target layers never change the non-T tokens, so the non-T key/value
projections of the K layers are computed together before the first of them
(:func:`~mtfm.model.layers.fused_context_kv`, switchable with ``fuse_target_kv``).

Only T-tokens feed the heads, so when the stack ends with a full layer, that layer's non-T
outputs reach nothing: it is built *pruned* (only T rows queried and updated, exact; see
``prune_last_full_layer``). Without pruning its non-T work is wasted and the parameters that
serve only that work get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mtfm.kernels import AttentionLayout
from mtfm.model.config import ModelConfig
from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer, fused_context_kv, shallow_copy


@dataclass(frozen=True)
class TokenGroups:
    """Group ids of one batch's tokens, in the model's group order.

    ``all`` [N]: index into every GLN over all groups; ``target`` [L_T]: the T-tokens' index
    into the T-only GLNs (the scenario's position among the model's scenarios).
    """

    all: Tensor
    target: Tensor


class HTABlock(nn.Module):
    """K target-attention layers, then P full-attention layers."""

    def __init__(
        self, config: ModelConfig, groups: list[str], target_groups: list[str], last: bool = False,
        link_widths: list[int] | None = None,
    ) -> None:
        """``last``: the stack's last block; its last full layer is pruned when the config says so.
        ``link_widths``: the content vectors' segments when the layers match content (mtfm.model.content)."""
        super().__init__()
        self.fuse_kv = config.fuse_target_kv
        self.targets = nn.ModuleList(
            TargetAttentionLayer(config, groups, target_groups, link_widths)
            for _ in range(config.target_layers_per_block)
        )
        p = config.full_layers_per_block
        prune = last and config.prune_last_full_layer
        self.fulls = nn.ModuleList(
            FullAttentionLayer(config, groups, target_groups if prune and i == p - 1 else None, link_widths)
            for i in range(p)
        )

    def forward(self, x: Tensor, groups: TokenGroups, layout: AttentionLayout) -> Tensor:
        if len(self.targets):
            ctx = layout.context().index
            tgt = layout.queries("target").index
            x_ctx, g_ctx = x.index_select(0, ctx), groups.all[ctx]
            layers = list(self.targets)
            if self.fuse_kv:
                kvs = fused_context_kv(layers, x_ctx, g_ctx)
            else:
                kvs = [layer.context_kv(x_ctx, g_ctx) for layer in layers]
            x_t, g_t = x.index_select(0, tgt), groups.all[tgt]
            for layer, (k_ctx, v_ctx) in zip(layers, kvs):
                x_t = layer(x_t, g_t, groups.target, k_ctx, v_ctx, layout)
            x = x.index_copy(0, tgt, x_t.to(x.dtype))
        for layer in self.fulls:
            x = layer(x, groups, layout)
        return x

    def subset(self, groups: list[str], target_groups: list[str]) -> "HTABlock":
        new = shallow_copy(self)
        new.targets = nn.ModuleList(layer.subset(groups, target_groups) for layer in self.targets)
        new.fulls = nn.ModuleList(layer.subset(groups, target_groups) for layer in self.fulls)
        return new


class HTAStack(nn.Module):
    """B blocks applied in turn to the ``[N, d_model]`` tokens of a batch."""

    def __init__(
        self, config: ModelConfig, groups: list[str], target_groups: list[str], link_widths: list[int] | None = None
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            HTABlock(config, groups, target_groups, last=i == config.blocks - 1, link_widths=link_widths)
            for i in range(config.blocks)
        )

    def forward(self, x: Tensor, groups: TokenGroups, layout: AttentionLayout) -> Tensor:
        for block in self.blocks:
            x = block(x, groups, layout)
        return x

    def subset(self, groups: list[str], target_groups: list[str]) -> "HTAStack":
        new = shallow_copy(self)
        new.blocks = nn.ModuleList(block.subset(groups, target_groups) for block in self.blocks)
        return new
