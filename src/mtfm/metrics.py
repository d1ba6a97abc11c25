"""Ranking metrics: AUC, GAUC (per-user AUC weighted by exposures) and logloss.

AUC comes from scikit-learn (a well-kept implementation). GAUC is vectorised with numpy
(one lexsort, no Python loop over users) and tested against a brute-force per-user loop.
Users whose exposures all carry one class have no AUC: they are skipped and *counted*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


@dataclass(frozen=True)
class GaucResult:
    gauc: float  # NaN when no user has both classes
    users_scored: int
    users_skipped_single_class: int
    exposures_scored: int


@dataclass(frozen=True)
class TaskMetrics:
    auc: float
    gauc: float
    logloss: float
    exposures: int
    positives: int
    users_scored: int
    users_skipped_single_class: int

    def as_dict(self) -> dict:
        return asdict(self)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class PerUserAuc:
    """Each scored user's AUC and exposure count (users with both classes), for GAUC and its bootstrap."""

    users: np.ndarray  # the user ids, ascending
    auc: np.ndarray
    exposures: np.ndarray
    users_skipped_single_class: int


def per_user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> PerUserAuc:
    """The AUC of every user with both classes (ties in score count one half), vectorised.

    GAUC is their exposure-weighted mean (:func:`gauc`); a user-level bootstrap resamples them
    (``mtfm.bench.scaling``), which is why they are exposed and not only their mean."""
    users, labels, scores = np.asarray(users), np.asarray(labels).astype(np.int8), np.asarray(scores, dtype=np.float64)
    if not (users.shape == labels.shape == scores.shape):
        raise ValueError(f"gauc: users {users.shape}, labels {labels.shape}, scores {scores.shape} differ in shape")
    if users.size == 0:
        return PerUserAuc(users[:0], np.zeros(0), np.zeros(0), 0)
    order = np.lexsort((scores, users))
    u, y, s = users[order], labels[order], scores[order]
    n = u.size
    user_start = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    user_id_of_row = np.cumsum(np.r_[True, u[1:] != u[:-1]]) - 1
    # Average rank within each run of equal (user, score): ties get the mean rank.
    run_start = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])])
    run_len = np.diff(np.r_[run_start, n])
    local_pos = np.arange(n) - user_start[user_id_of_row] + 1.0  # 1-based rank within user
    run_mean_rank = np.add.reduceat(local_pos, run_start) / run_len
    rank = np.repeat(run_mean_rank, run_len)

    n_users = user_start.size
    pos = np.bincount(user_id_of_row, weights=y, minlength=n_users)
    cnt = np.bincount(user_id_of_row, minlength=n_users).astype(np.float64)
    neg = cnt - pos
    rank_sum_pos = np.bincount(user_id_of_row, weights=rank * y, minlength=n_users)
    valid = (pos > 0) & (neg > 0)
    user_auc = (rank_sum_pos[valid] - pos[valid] * (pos[valid] + 1) / 2) / (pos[valid] * neg[valid])
    return PerUserAuc(u[user_start][valid], user_auc, cnt[valid], int((~valid).sum()))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> GaucResult:
    """Exposure-weighted mean of per-user AUC (ties in score count one half)."""
    per_user = per_user_auc(users, labels, scores)
    weights = per_user.exposures
    value = float(np.sum(per_user.auc * weights) / np.sum(weights)) if weights.size else float("nan")
    return GaucResult(value, int(weights.size), per_user.users_skipped_single_class, int(weights.sum()))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float(log_loss(labels, np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7), labels=[0, 1]))


def task_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> TaskMetrics:
    """All metrics of one (scenario, task): AUC, GAUC, logloss, counts."""
    g = gauc(users, labels, probs)
    return TaskMetrics(
        auc=auc(labels, probs),
        gauc=g.gauc,
        logloss=logloss(labels, probs),
        exposures=int(np.asarray(labels).size),
        positives=int(np.asarray(labels).sum()),
        users_scored=g.users_scored,
        users_skipped_single_class=g.users_skipped_single_class,
    )
