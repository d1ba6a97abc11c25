import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.data.batch import (
    TOKEN_H,
    TOKEN_R,
    TOKEN_T,
    FeatureTensors,
    ScenarioBatch,
    SequenceBatch,
    build_token_layout,
    realtime_expiry,
)


def _seq(offsets, ts):
    return SequenceBatch(torch.tensor(offsets), torch.tensor(ts), FeatureTensors())


def _scen(offsets, ts):
    z = torch.zeros(len(ts), 1)
    return ScenarioBatch(torch.tensor(offsets), torch.tensor(ts), FeatureTensors(), FeatureTensors(), FeatureTensors(),
                         z, z.bool(), z)


def test_token_layout_orders_history_chronologically_then_realtime_then_targets_by_scenario():
    # Two users; two history types interleave in time; one real-time type; two scenarios.
    history = {"orders": _seq([0, 2, 3], [10, 30, 5]), "clicks": _seq([0, 1, 3], [20, 1, 7])}
    realtime = {"rt": _seq([0, 1, 2], [40, 8])}
    scenarios = {"A": _scen([0, 1, 2], [50, 9]), "B": _scen([0, 2, 2], [45, 46])}
    lay = build_token_layout(history, realtime, scenarios, batch_size=2)
    assert lay.offsets.tolist() == [0, 7, 12]
    H, R, T = TOKEN_H, TOKEN_R, TOKEN_T
    assert lay.token_type.tolist() == [H, H, H, R, T, T, T, H, H, H, R, T]
    # T-tokens keep scenario order (A before B) even when B's exposures are earlier.
    assert lay.timestamps.tolist() == [10, 20, 30, 40, 50, 45, 46, 1, 5, 7, 8, 9]
    assert lay.group_ids.tolist() == [0, 1, 0, 2, 3, 4, 4, 1, 0, 1, 2, 3]
    assert lay.source_row.tolist() == [0, 0, 1, 0, 0, 0, 1, 1, 2, 2, 1, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=9), min_size=1, max_size=4), st.integers(1, 4))
def test_expiry_admits_exactly_the_max_len_most_recent_actions_strictly_before_a_query(users, max_len):
    """The mask's R rule (t_k < t_q <= expiry_k) against the definition, with ties in time."""
    stamps = [sorted(u) for u in users]
    offsets = torch.tensor([0, *itertools.accumulate(len(u) for u in stamps)])
    flat = torch.tensor([t for u in stamps for t in u], dtype=torch.long)
    expiry = realtime_expiry(offsets, flat, max_len)
    for b, times in enumerate(stamps):
        lo = int(offsets[b])
        for t_q in range(-1, 9):
            earlier = [lo + i for i, t in enumerate(times) if t < t_q]
            want = earlier[-max_len:]
            got = [lo + i for i, t in enumerate(times) if t < t_q <= int(expiry[lo + i])]
            assert got == want, (times, t_q, max_len)
