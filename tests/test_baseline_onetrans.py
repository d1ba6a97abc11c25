"""OneTrans baseline (issue 14): an empty scenario, config checks, parameter layout, the pyramid,
visibility, and the shared (per-user) S computation against computing every exposure alone (the
shared baseline contract: shapes, round-trip, training, no shared parameters: test_baseline_contract.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from baseline_contract import ARCHS, one_thread_fixture

from mtfm.baselines.onetrans import OneTrans, OneTransConfig, ScenarioOneTrans
from mtfm.data.batch import (
    JaggedBatch,
    SequenceBatch,
    build_token_layout,
    realtime_expiry,
    take_feature_rows,
    take_scenario_rows,
)
from mtfm.data.per_exposure import per_exposure_batch
from mtfm.model.testing import random_batch, tiny_schema

_model = ARCHS["onetrans"].model  # in eval mode; its max_history (4) is below random_batch's up to 12 H rows
_one_thread = one_thread_fixture()


def _logits(model: OneTrans, batch: JaggedBatch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(batch).logits


def _rebuild(batch: JaggedBatch, realtime: dict | None = None, scenarios: dict | None = None) -> JaggedBatch:
    realtime = batch.realtime if realtime is None else realtime
    scenarios = batch.scenarios if scenarios is None else scenarios
    layout = build_token_layout(batch.history, realtime, scenarios, batch.batch_size)
    return JaggedBatch(batch.user_ids, batch.window_start, batch.history, realtime, scenarios, layout)


def _drop_realtime_rows(batch: JaggedBatch, name: str, drop: torch.Tensor) -> JaggedBatch:
    """``batch`` without the real-time rows flagged in ``drop`` (expiries recomputed, as the loader would)."""
    seq, max_len = batch.realtime[name], tiny_schema().realtime[0].max_len
    keep = torch.nonzero(~drop).flatten()
    users = torch.repeat_interleave(torch.arange(batch.batch_size), seq.offsets[1:] - seq.offsets[:-1])
    offsets = torch.zeros(batch.batch_size + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(users[keep], minlength=batch.batch_size), 0)
    ts = seq.timestamps[keep]
    new = SequenceBatch(offsets, ts, take_feature_rows(seq.features, keep), realtime_expiry(offsets, ts, max_len))
    return _rebuild(batch, realtime={**batch.realtime, name: new})


def _exposures(batch: JaggedBatch) -> list[tuple[str, int, int, int]]:
    """``(scenario, row, user, timestamp)`` of every exposure."""
    out = []
    for name, sc in batch.scenarios.items():
        users = torch.repeat_interleave(torch.arange(batch.batch_size), sc.offsets[1:] - sc.offsets[:-1])
        out += [(name, i, int(users[i]), int(sc.timestamps[i])) for i in range(sc.num_rows)]
    return out


def test_a_scenario_without_exposures_gives_empty_logits_and_a_finite_loss() -> None:
    model = _model()
    empty = random_batch(tiny_schema(), 2, seed=2, lengths={"coupon": [0, 0], "feed": [1, 1]})
    assert model(empty).logits["coupon"].shape == (0, 2)
    assert torch.isfinite(model.loss(empty, model(empty)))


def test_config_history_queries_and_pyramid_checks() -> None:
    assert OneTransConfig().history_queries() == [64, 32, 0]
    assert OneTransConfig(num_layers=1).history_queries() == [0]
    with pytest.raises(ValueError, match="pyramid"):
        OneTransConfig(num_layers=2, pyramid=[8, 4])  # the last layer must have NS queries only
    with pytest.raises(ValueError, match="pyramid"):
        OneTransConfig(num_layers=3, pyramid=[4, 8, 0])


def test_ns_tokens_have_their_own_parameters_and_s_tokens_share() -> None:
    model = _model()
    sub: ScenarioOneTrans = model.scenarios["feed"]
    k, d = sub.num_ns, 16
    assert k == 6  # user, cross, item x 2 tokens each
    for layer in sub.layers:
        assert isinstance(layer.s_qkv, torch.nn.Linear) and layer.s_qkv.weight.shape == (3 * d, d)  # one for all S
        assert layer.ns_qkv.weight.shape == (k, d, 3 * d) and layer.ns_ffn1.weight.shape[0] == k
        assert not torch.equal(layer.ns_qkv.weight[0], layer.ns_qkv.weight[1])
    # Functional: token j's own FFN (last layer) changes token j's final state and no other.
    batch = random_batch(tiny_schema(), 4, seed=4)
    with torch.no_grad():
        before = sub.ns_states(batch)
        sub.layers[-1].ns_ffn2.bias[3] += 1.0
        after = sub.ns_states(batch)
    changed = (before - after).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [j == 3 for j in range(k)]


def test_pyramid_keeps_the_most_recent_history_queries() -> None:
    model = _model(num_layers=3, max_history=4)  # H queries per layer: 4, 2, then NS only
    sub: ScenarioOneTrans = model.scenarios["feed"]
    batch = random_batch(tiny_schema(), 5, seed=5, lengths={"orders": [6, 0, 3, 5, 1], "clicks": [6, 2, 0, 4, 1],
                                                            "feed": [2, 1, 1, 3, 1]})
    with torch.no_grad():
        states = sub.sequence_states(batch)
    assert len(states) == 3
    first = states[0]
    for u in range(batch.batch_size):  # the input keeps each user's max_history most recent H rows
        times = torch.sort(torch.cat([s.timestamps[s.offsets[u]:s.offsets[u + 1]] for s in batch.history.values()]))
        want = times.values[-4:]
        assert torch.equal(first.h_time[u][first.h_valid[u]], want)
    for layer, width in ((1, 4), (2, 2)):  # entering layer l: the last q_{l-1} H tokens, every R token
        s = states[layer]
        assert s.h.shape[1] == width
        assert torch.equal(s.h_time, first.h_time[:, -width:]) and torch.equal(s.h_valid, first.h_valid[:, -width:])
        assert torch.equal(s.r_time, first.r_time) and s.r.shape == first.r.shape


def test_history_beyond_max_history_is_ignored_and_visible_history_matters() -> None:
    model = _model()
    batch = random_batch(tiny_schema(), 3, seed=6, lengths={"orders": [6, 6, 6], "clicks": [0, 0, 0],
                                                            "feed": [2, 1, 1]})
    base = _logits(model, batch)
    for row, should_change in ((0, False), (5, True)):  # user 0's oldest (beyond max_history 4) / newest H row
        changed = copy.deepcopy(batch)
        ids = changed.history["orders"].features.categorical["item_id"]
        ids[row] = (ids[row] + 1) % 50
        new = _logits(model, changed)
        for name, sc in batch.scenarios.items():
            end = int(sc.offsets[1])  # rows before: user 0's exposures; after: the other users'
            if end:
                diff = float((new[name][:end] - base[name][:end]).abs().max())
                assert (diff > 1e-6) == should_change, (row, name, diff)
            assert torch.equal(new[name][end:], base[name][end:])


def test_realtime_rows_at_or_after_an_exposure_do_not_change_it() -> None:
    model = _model()
    batch = random_batch(tiny_schema(), 4, seed=7)
    seq = batch.realtime["recent"]
    base = _logits(model, batch)
    reached = False
    users_r = torch.repeat_interleave(torch.arange(batch.batch_size), seq.offsets[1:] - seq.offsets[:-1])
    for name, row, user, t in _exposures(batch):
        future = (users_r == user) & (seq.timestamps >= t)
        if not bool(future.any()):
            continue
        changed = copy.deepcopy(batch)
        ids = changed.realtime["recent"].features.categorical["item_id"]
        ids[future] = (ids[future] + 1) % 50
        for variant in (changed, _drop_realtime_rows(batch, "recent", future)):
            new = _logits(model, variant)
            assert torch.allclose(new[name][row], base[name][row], atol=1e-6, rtol=0)
            reached = reached or any(not torch.allclose(new[n], base[n], atol=1e-6) for n in base)
    assert reached  # the changes did reach the exposures that may see those rows


def test_removing_another_exposure_of_the_user_changes_nothing() -> None:
    model = _model()
    batch = random_batch(tiny_schema(), 3, seed=8, lengths={"feed": [3, 2, 1], "food": [2, 0, 1], "coupon": [1, 1, 0]})
    base = _logits(model, batch)
    for name, sc in batch.scenarios.items():
        for drop in range(sc.num_rows):
            keep = torch.tensor([i for i in range(sc.num_rows) if i != drop], dtype=torch.long)
            users = torch.repeat_interleave(torch.arange(batch.batch_size), sc.offsets[1:] - sc.offsets[:-1])
            offsets = torch.zeros(batch.batch_size + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(torch.bincount(users[keep], minlength=batch.batch_size), 0)
            smaller = _rebuild(batch, scenarios={**batch.scenarios, name: take_scenario_rows(sc, keep, offsets)})
            new = _logits(model, smaller)
            for other in base:
                want = base[other][keep] if other == name else base[other]
                assert torch.allclose(new[other], want, atol=1e-5, rtol=0), (name, drop, other)


@pytest.mark.parametrize("view", ["past", "window"])
def test_shared_user_computation_equals_each_exposure_alone(view: str) -> None:
    model = _model()
    batch = random_batch(tiny_schema(), 6, seed=9)
    shared = _logits(model, batch)
    alone = _logits(model, per_exposure_batch(batch, view))  # one exposure per sample, rows in the same order
    for name in shared:
        assert shared[name].shape == alone[name].shape
        assert torch.allclose(shared[name], alone[name], atol=1e-5, rtol=0), name
