import numpy as np
from hypothesis import given, settings, strategies as st
from sklearn.metrics import roc_auc_score

from mtfm.metrics import auc, gauc, task_metrics


def _brute_force_gauc(users, labels, scores):
    num, den, skipped = 0.0, 0.0, 0
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            skipped += 1
            continue
        num += roc_auc_score(labels[m], scores[m]) * m.sum()
        den += m.sum()
    return (num / den if den else float("nan")), skipped


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    n_users=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    coarse=st.booleans(),
)
def test_gauc_matches_brute_force_per_user_auc(n, n_users, seed, coarse):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    labels = rng.integers(0, 2, n)
    scores = rng.random(n)
    if coarse:  # many ties in score
        scores = np.round(scores, 1)
    expected, skipped = _brute_force_gauc(users, labels, scores)
    got = gauc(users, labels, scores)
    assert got.users_skipped_single_class == skipped
    if np.isnan(expected):
        assert np.isnan(got.gauc)
    else:
        assert abs(got.gauc - expected) < 1e-12


def test_auc_single_class_is_nan_and_task_metrics_counts():
    assert np.isnan(auc(np.ones(5), np.arange(5)))
    users = np.array([0, 0, 1, 1, 2])
    labels = np.array([1, 0, 1, 1, 0])
    m = task_metrics(users, labels, np.array([0.9, 0.1, 0.5, 0.4, 0.3]))
    assert m.users_scored == 1 and m.users_skipped_single_class == 2
    assert m.gauc == 1.0 and m.positives == 3 and m.exposures == 5
