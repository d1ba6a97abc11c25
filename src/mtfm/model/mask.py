"""The dynamic mask (paper section 3.2.2, Figure 2), defined once and used by every backend.

Which key token ``k`` may a query token ``q`` of the same user attend to?

1. H-tokens are visible to every token;
2. R-tokens are visible only to tokens with a strictly later timestamp (an action at or after
   an exposure must not inform that exposure: information leakage);
3. T-tokens are visible only to themselves.

Every token also sees itself. For H and T this is already implied; for an R-token it is the
one choice the rules leave open ("visible to later tokens" says nothing about the token
itself). Seeing itself leaks nothing and keeps an R-token without earlier context from an
all-zero attention row, so the diagonal is always visible.

Consequences the faster kernels rely on: no token ever attends to another T-token, so keys
can be restricted to the user's non-T ("context") tokens plus each T query's own key; and a
T-token's output depends only on H, earlier R and itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T


def visible(q_time: Tensor, q_pos: Tensor, k_type: Tensor, k_time: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean mask ``M[q, k]`` for broadcastable query / key token attributes.

    The rule depends on the key's type only (and on the query's timestamp). ``*_pos``
    identify tokens (their flat position), so ``q_pos == k_pos`` is the diagonal. Users are
    not compared here: callers only pair tokens of the same user.
    """
    same = q_pos == k_pos
    history = k_type == TOKEN_H
    realtime_earlier = (k_type == TOKEN_R) & (k_time < q_time)
    return history | realtime_earlier | same


def dense_user_mask(token_type: Tensor, timestamps: Tensor) -> Tensor:
    """The full ``[N, N]`` mask of one user's tokens (rows: queries, columns: keys)."""
    pos = torch.arange(token_type.shape[0], device=token_type.device)
    return visible(timestamps[:, None], pos[:, None], token_type[None, :], timestamps[None, :], pos[None, :])


__all__ = ["visible", "dense_user_mask", "TOKEN_H", "TOKEN_R", "TOKEN_T"]
