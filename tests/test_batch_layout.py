import torch

from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T, FeatureTensors, ScenarioBatch, SequenceBatch, build_token_layout


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
