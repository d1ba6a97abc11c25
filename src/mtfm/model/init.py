"""Similarity initialisation: target attention that starts by matching alike tokens (issue 10).

Why. In the synthetic world a recent click on the exposure's own cuisine raises its CTR, and
the only way a T-token can read that is to attend more to R-tokens *of its own content*. With
independent random weights nothing relates a T-token's query to the key of an R-token of the
same cuisine: the tokenizers are different MLPs, and ``W_Q`` and ``W_K`` are unrelated. The
gradient towards such an alignment is second order (it needs the attention pattern and the
value read-out to change together), so training sits at a saddle whose escape time grows as
the signal gets rarer (BENCHMARKS.md, issue 10: the 3.5% of boosted HP exposures are never
learned).

What. Only the *initial* weights change; the architecture, the parameters and what they may
learn are the paper's. Three ties, each broken by training as soon as the data wants:

1. Tokenizers start as one MLP: a shared embedding table (a feature that reads the same table,
   e.g. ``cuisine`` of a search click and of an HP exposure) gets first-layer columns of one
   direction in every tokenizer, and every later layer starts equal across tokenizers, with
   zero biases (with the default biases every token is the same bias-driven vector: cosine
   0.98 between any T- and R-token after LayerNorm). Each feature's columns are scaled so it
   adds a set share of the hidden variance: the *link* features (tables read by both a T field
   and a context field) half, the rest the other half. Without that the numeric encoders
   (outputs of order 1) drown the embeddings (std 0.05) 300 to 1: on the default synthetic
   world an HP exposure and a click of its cuisine start at cosine 0.10 (other cuisine 0.06);
   balanced, 0.47 against 0.07.
2. Queries start equal to keys (head ``h`` copies the key weights of its kv group), so
   ``SiLU(W x) . SiLU(W y)`` is a similarity of the two normalised tokens: alike tokens
   attend to each other more from the first step.
3. The gate ``U`` starts equal to the values (``U_h`` copies ``V`` of head h's group), so
   ``sum(A * U)`` is a similarity between what a T-token attended to and itself: "the recent
   actions look like this item" exists as a feature at step 0 and a linear read-out can use it.

Use it with a closed own key (``time_bias_self_init``, :mod:`mtfm.model.layers`): with Q tied to
K a T-token's own key is its best match, and its own value would drown the one recent action
that matches it. On the match world (``benchmarks/match_world.py``) neither change alone moves
the model off the "any recent click" proxy; together they learn the cuisine match.
"""

from __future__ import annotations

import torch
from torch import nn

from mtfm.config import NumericFeature
from mtfm.model.content import link_tables
from mtfm.model.embedding import FeatureEmbeddings, module_key
from mtfm.model.layers import MLP, FullAttentionLayer, TargetAttentionLayer


LINK_SHARE = 0.5  # share of a token's initial hidden variance carried by its link features (align_tokenizers)


def _feature_columns_named(
    embeddings: FeatureEmbeddings, fields: list[str]
) -> list[tuple[str, str, str | None, slice]]:
    """(field, feature, table key or None for a numeric encoder, input columns) of a tokenizer over
    ``fields``, in concatenation order."""
    out: list[tuple[str, str, str | None, slice]] = []
    start = 0
    for field in fields:
        for feat in embeddings.fields[field]:
            if isinstance(feat, NumericFeature):
                width, key = embeddings.numeric_dim, None
            else:
                key = embeddings.table_of[(field, feat.name)]
                width = embeddings.tables[key].embedding_dim
            out.append((field, feat.name, key, slice(start, start + width)))
            start += width
    return out


def _column_variance(embeddings: FeatureEmbeddings, field: str, feature: str, key: str | None) -> float:
    """Variance of one input column at initialisation: the table's, or a numeric encoder's output
    for a standardised input (``w^2 + b^2``, averaged over its columns)."""
    if key is not None:
        return float(embeddings.tables[key].weight.var())
    encoder = embeddings.numeric[module_key(field, feature)]
    return float((encoder.weight.squeeze(1) ** 2 + encoder.bias**2).mean())


@torch.no_grad()
def align_tokenizers(embeddings: FeatureEmbeddings, tokenizers: list[tuple[MLP, list[str]]]) -> None:
    """Tie 1: shared tables get first-layer columns of one direction, later layers start equal.

    ``tokenizers``: each MLP with the embedding fields it reads, in concatenation order.
    Each feature's block is scaled so that it adds a set share of the variance of every hidden
    pre-activation (total 1): the link features (tables a T-token shares with context tokens,
    e.g. ``cuisine``) together :data:`LINK_SHARE`, the others the rest, equally. Without this, a
    token's numeric encoders (outputs of order 1) drown its embeddings (std 0.05) 300 to 1, and
    the one feature that could make an exposure and a click alike is invisible at step 0.
    """
    if len(tokenizers) < 2:
        return
    reference, _ = tokenizers[0]
    links = set(link_tables(embeddings))
    hidden = reference[0].out_features
    unit_block: dict[str, torch.Tensor] = {}
    for mlp, fields in tokenizers:
        first: nn.Linear = mlp[0]
        columns = _feature_columns_named(embeddings, fields)
        n_link = sum(key in links for _, _, key, _ in columns)
        n_other = len(columns) - n_link
        for field, feature, key, cols in columns:
            if key is not None and key in unit_block:
                block = unit_block[key]
            else:
                block = torch.randn(hidden, cols.stop - cols.start)
                if key is not None:
                    unit_block[key] = block
            is_link = key in links
            share = (LINK_SHARE if n_other else 1.0) / n_link if is_link else (1.0 - LINK_SHARE if n_link else 1.0) / n_other
            variance = _column_variance(embeddings, field, feature, key) * block.shape[1]
            first.weight[:, cols] = block * (share / variance) ** 0.5
        for mine, ref in zip(list(mlp)[1:], list(reference)[1:]):
            if isinstance(mine, nn.Linear):
                mine.weight.copy_(ref.weight)
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                layer.bias.zero_()


def _tie_rows(weight: torch.Tensor, bias: torch.Tensor, dst: int, src: int, width: int) -> None:
    weight[dst : dst + width] = weight[src : src + width]
    bias[dst : dst + width] = bias[src : src + width]


@torch.no_grad()
def tie_attention(layer: TargetAttentionLayer | FullAttentionLayer) -> None:
    """Ties 2 and 3 in one layer: ``Q_h <- K_g(h)`` and ``U_h <- V_g(h)`` (weights and biases)."""
    heads, groups, dh = layer.heads, layer.kv_groups, layer.dh
    per_group = heads // groups
    width = heads * dh
    if isinstance(layer, TargetAttentionLayer):  # f_uq = [U | Q], f_kv = [K | V]
        uq, kv = (layer.f_uq.weight, layer.f_uq.bias), (layer.f_kv.weight, layer.f_kv.bias)
        u0, q0, k0, v0 = 0, width, 0, groups * dh
        for h in range(heads):
            g = h // per_group
            uq[0][q0 + h * dh : q0 + (h + 1) * dh] = kv[0][k0 + g * dh : k0 + (g + 1) * dh]
            uq[1][q0 + h * dh : q0 + (h + 1) * dh] = kv[1][k0 + g * dh : k0 + (g + 1) * dh]
            uq[0][u0 + h * dh : u0 + (h + 1) * dh] = kv[0][v0 + g * dh : v0 + (g + 1) * dh]
            uq[1][u0 + h * dh : u0 + (h + 1) * dh] = kv[1][v0 + g * dh : v0 + (g + 1) * dh]
        return
    w, b = layer.f1.weight, layer.f1.bias  # f1 = [U | Q | K | V]
    q0, k0 = width, 2 * width
    v0 = k0 + groups * dh
    for h in range(heads):
        g = h // per_group
        _tie_rows(w, b, q0 + h * dh, k0 + g * dh, dh)
        _tie_rows(w, b, h * dh, v0 + g * dh, dh)


def similarity_init(model: nn.Module, tokenizers: list[tuple[MLP, list[str]]]) -> None:
    """Apply the three ties to a freshly built model (``model.embeddings``, ``model.stack``)."""
    align_tokenizers(model.embeddings, tokenizers)
    for module in model.stack.modules():
        if isinstance(module, (TargetAttentionLayer, FullAttentionLayer)):
            tie_attention(module)
