"""Content match: attention scores that see "this exposure's cuisine = that click's cuisine" (issue 10).

ADDITION (not in the paper; ``content_match`` in :class:`~mtfm.model.config.ModelConfig`).

Why. In the synthetic world a click on the exposure's own cuisine in the last 30 minutes adds
+1.2 to the true click logit, and LightGBM with one hand-made count ("recent clicks of this
cuisine") beats every neural model (BENCHMARKS.md, issue 14). MTFM can only read that signal by
attending more to the context tokens *of its own content*, i.e. by aligning ``W_Q`` and ``W_K``
on the shared features. That alignment is a second-order effect of training (a saddle: the
attention pattern and the value read-out must change together), and with 3.5% of exposures
carrying the signal it is not learned in the epochs before the id embeddings overfit, also
with similarity-tied initial weights (:mod:`mtfm.model.init`).

What. The features a T-token shares with context tokens are known from the schema: the *link
tables*, embedding tables read by a scenario's features and by a history / real-time sequence
(``share:`` in the schema, e.g. ``cuisine`` and ``item_id``). Every token carries, per link
table, the unit vector of its own embedding in that table (zero when it has no feature reading
the table). Each attention layer adds to its score, per head ``h``::

    SiLU(alpha <Q_h, K> + sum_f w[h, f] * cos(e_f(query), e_f(key)) + time bias) ...

which it computes by appending ``w[h, f] e_f(query) / alpha`` to the query and ``e_f(key)`` to
the key (:func:`append_content`), so every attention backend (reference, jagged, Triton) runs
it unchanged. Identical ids have cosine 1 whatever the embedding, so "same cuisine" is a first-
order feature of the score from step 0, and ``w`` (learned, one per layer, head and table) says
how much each head cares. A T-token's own key carries no content (its own match is trivially
1 and would drown the one recent click that matches it); T keys are never seen by other tokens.
Context queries in full layers match context keys the same way (a search click and an order of
the same cuisine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm.config import NumericFeature
from mtfm.data.batch import TOKEN_T, JaggedBatch
from mtfm.kernels.common import AttentionLayout
from mtfm.model.embedding import FeatureEmbeddings
from mtfm.sharing import links_scenario_and_sequence


def link_tables(embeddings: FeatureEmbeddings) -> list[str]:
    """Tables read by a T field and by a context (H or R) field, sorted: the only features that
    can make a T-token and a context token alike (the rule: :func:`mtfm.sharing.links_scenario_and_sequence`)."""
    readers: dict[str, list[str]] = {}
    for (field, _), key in embeddings.table_of.items():
        readers.setdefault(key, []).append(field)
    return sorted(key for key, fields in readers.items() if links_scenario_and_sequence(fields))


def link_widths(embeddings: FeatureEmbeddings, links: list[str]) -> list[int]:
    """Embedding width of each link table (the content vector's segments, in ``links`` order)."""
    return [embeddings.tables[key].embedding_dim for key in links]


def token_content(embeddings: FeatureEmbeddings, links: list[str], sources: list[tuple[str, object]], num_rows: int) -> Tensor:
    """``[num_rows, sum(widths)]``: per link table, the unit vector of what one kind of token reads from it.

    ``sources``: the token's embedding fields with their feature tensors (one for a sequence token;
    a scenario's user, cross and item parts for a T-token). Several features reading one table
    (rare) are summed before normalising; a table the token does not read gives zeros (no match).
    """
    parts: list[Tensor] = []
    for key in links:
        vectors = [
            embeddings.embed_feature(field, feat, features, num_rows)
            for field, features in sources
            for feat in embeddings.fields[field]
            if not isinstance(feat, NumericFeature) and embeddings.table_of[(field, feat.name)] == key
        ]
        if vectors:
            parts.append(F.normalize(torch.stack(vectors).sum(0), dim=-1))
        else:
            parts.append(embeddings.tables[key].weight.new_zeros((num_rows, embeddings.tables[key].embedding_dim)))
    return torch.cat(parts, dim=1)


def batch_content(embeddings: FeatureEmbeddings, links: list[str], batch: JaggedBatch) -> Tensor:
    """``[N, sum(widths)]``: every token's content vector, in the batch's layout order."""
    parts: list[Tensor] = []
    for name, seq in batch.history.items():
        parts.append(token_content(embeddings, links, [(f"H:{name}", seq.features)], seq.num_rows))
    for name, seq in batch.realtime.items():
        parts.append(token_content(embeddings, links, [(f"R:{name}", seq.features)], seq.num_rows))
    for name, scenario in batch.scenarios.items():
        sources = [(f"T:{name}:{part}", getattr(scenario, part)) for part in ("user", "cross", "item")
                   if f"T:{name}:{part}" in embeddings.fields]
        parts.append(token_content(embeddings, links, sources, scenario.num_rows))
    return in_layout_order(parts, batch)


def in_layout_order(parts: list[Tensor], batch: JaggedBatch) -> Tensor:
    """Rows of the per-group tensors ``parts`` (history, real-time, scenarios, in the batch's
    order) placed at their tokens' positions in the batch layout."""
    sizes = torch.tensor([p.shape[0] for p in parts], dtype=torch.long, device=batch.layout.group_ids.device)
    base = torch.cumsum(sizes, 0) - sizes
    return torch.cat(parts).index_select(0, base[batch.layout.group_ids] + batch.layout.source_row)


def append_content(q: Tensor, k: Tensor, layout: AttentionLayout, query_index: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Queries ``[Nq, H, d + W]`` and keys ``[N, G, d + W]`` whose dot product adds the content match.

    ``layout.content [N, W]``: unit content vectors of all tokens (:func:`batch_content`);
    ``query_index``: the query tokens' rows in it; ``weight [H, W]``: the layer's weight per head,
    one column per content column, already divided by the attention's ``alpha`` (so the weights
    are in score units). T-tokens' keys carry no content (see the module docstring); those keys
    are built once per layout and shared by all layers.
    """
    if layout.content is None:
        raise ValueError(
            "this layer matches content (content_match) but the attention layout carries no content "
            "vectors; build the layout with MTFMBase.attention_layout(batch)"
        )
    key = ("content_keys",)
    if key not in layout.cache:
        layout.cache[key] = layout.content.masked_fill((layout.token_type == TOKEN_T)[:, None], 0.0)
    q_content = layout.content.index_select(0, query_index)[:, None, :] * weight[None]
    k_content = layout.cache[key][:, None, :].expand(-1, k.shape[1], -1)
    return torch.cat([q, q_content.to(q.dtype)], dim=-1), torch.cat([k, k_content.to(k.dtype)], dim=-1)
