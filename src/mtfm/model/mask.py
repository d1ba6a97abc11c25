"""The dynamic mask (paper section 3.2.2, Figure 2), defined once and used by every backend.

Which key token ``k`` may a query token ``q`` of the same user attend to?

1. H-tokens are visible to every token;
2. an R-token is visible only to tokens with a strictly later timestamp (an action at or after
   an exposure must not inform that exposure: information leakage), and only while it is
   still among the ``max_len`` most recent actions of its type before that query;
3. T-tokens are visible only to themselves.

Every token also sees itself. For H and T this is already implied; for an R-token it is the
one choice the rules leave open. Seeing itself leaks nothing and keeps an R-token without
earlier context from an all-zero attention row, so the diagonal is always visible.

Rule 2 is what a request would see: at serving time a request at ``t`` holds the ``max_len``
most recent actions of each real-time type strictly before ``t``. An aggregated sample stores
every real-time action inside its window (plus the ``max_len`` before it, see
:mod:`mtfm.data.aggregate`), so each query must pick its own ``max_len`` out of them. The data
layer turns the rank rule into one number per R-token, its **expiry** (see
:func:`mtfm.data.batch.realtime_expiry`): the timestamp of the ``max_len``-th later action of the
same type (``+inf`` when there is none). With actions in time order, "``k`` is among the
``max_len`` most recent actions of its type strictly before ``t_q``" is exactly
``t_k < t_q <= expiry_k``: the count of actions before ``t_q`` reaches past ``k`` by ``max_len``
only once the ``max_len``-th later action is itself strictly before ``t_q``. So the mask stays a
function of per-token scalars (type, timestamp, expiry), which kernels evaluate in registers.
H and T tokens carry ``expiry = +inf`` (:data:`NEVER`); it is not read for them.

Consequences the faster kernels rely on: no token ever attends to another T-token, so keys
can be restricted to the user's non-T ("context") tokens plus each T query's own key; and a
T-token's output depends only on H, its own R view and itself. Anything at or after its
timestamp (its own click, later actions, other exposures) cannot change it; the tests in
``tests/test_leakage.py`` prove that from raw tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtfm.data.batch import NEVER, TOKEN_H, TOKEN_R, TOKEN_T


def visible(q_time: Tensor, q_pos: Tensor, k_type: Tensor, k_time: Tensor, k_expiry: Tensor, k_pos: Tensor) -> Tensor:
    """Boolean mask ``M[q, k]`` for broadcastable query / key token attributes.

    The rule depends on the key's type, timestamp and expiry and on the query's timestamp.
    ``*_pos`` identify tokens (their flat position), so ``q_pos == k_pos`` is the diagonal.
    Users are not compared here: callers only pair tokens of the same user.
    """
    same = q_pos == k_pos
    history = k_type == TOKEN_H
    realtime_in_view = (k_type == TOKEN_R) & (k_time < q_time) & (q_time <= k_expiry)
    return history | realtime_in_view | same


def dense_user_mask(token_type: Tensor, timestamps: Tensor, expiry: Tensor | None = None) -> Tensor:
    """The full ``[N, N]`` mask of one user's tokens (rows: queries, columns: keys)."""
    pos = torch.arange(token_type.shape[0], device=token_type.device)
    if expiry is None:
        expiry = torch.full_like(timestamps, NEVER)
    return visible(timestamps[:, None], pos[:, None], token_type[None, :], timestamps[None, :], expiry[None, :],
                   pos[None, :])


__all__ = ["visible", "dense_user_mask", "NEVER", "TOKEN_H", "TOKEN_R", "TOKEN_T"]
