"""Properties of the whole model: no leakage, permutation equivariance, batch independence,
subgraph equality, gradients, backend agreement, subsets of scenarios."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtfm.data.batch import FeatureTensors, JaggedBatch, SequenceBatch
from mtfm.model import MTFM
from mtfm.model.batch_ops import reorder_scenario_rows, restrict_batch, select_users
from mtfm.model.testing import random_batch, tiny_config, tiny_schema

SCHEMA = tiny_schema()

configs = st.builds(
    lambda backend, bias, hg, hta: tiny_config(attention_backend=backend, relative_time_bias=bias[0],
                                               relative_position_bias=bias[1], num_heads=hg[0],
                                               num_kv_groups=hg[1]).with_hta(hta),
    backend=st.sampled_from(["reference", "jagged"]),
    bias=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    hg=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
    hta=st.sampled_from(["(1:1)x2", "(2:1)x1", "(0:2)x1", "(2:0)x1"]),
)


def _model(config, seed: int) -> MTFM:
    torch.manual_seed(seed)
    model = MTFM(SCHEMA, config).eval()
    with torch.no_grad():  # non-trivial norms and time biases (their defaults are ones / zeros)
        for name, p in model.named_parameters():
            if "gln" in name or "_bias" in name or "final_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _redraw(features: FeatureTensors, rows: torch.Tensor, seed: int) -> FeatureTensors:
    """The same features with new random values in ``rows`` (ids stay inside their range)."""
    g = torch.Generator().manual_seed(seed)
    cat = {}
    for k, v in features.categorical.items():
        new = v.clone()
        new[rows] = torch.randint(0, 2, (rows.numel(),), generator=g)
        cat[k] = new
    num = {}
    for k, v in features.numeric.items():
        new = v.clone()
        new[rows] = torch.randn(rows.numel(), generator=g) * 5
        num[k] = new
    multi = {}
    for k, (values, offsets) in features.multi.items():
        new = values.clone()
        owner = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
        hit = torch.isin(owner, rows)
        new[hit] = torch.randint(0, 2, (int(hit.sum()),), generator=g)
        multi[k] = (new, offsets)
    return FeatureTensors(cat, num, multi)


def _t_token(batch: JaggedBatch, pick: int) -> tuple[str, int, int, int]:
    """(scenario, row, user, timestamp) of one exposure chosen by ``pick``."""
    names = [n for n, s in batch.scenarios.items() if s.num_rows]
    name = names[pick % len(names)]
    sc = batch.scenarios[name]
    row = (pick // len(names)) % sc.num_rows
    user = int(torch.searchsorted(sc.offsets, torch.tensor(row), right=True)) - 1
    return name, row, user, int(sc.timestamps[row])


@settings(max_examples=15, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), pick=st.integers(0, 1000))
def test_no_leakage_from_future_realtime_tokens(config, seed, pick):
    model = _model(config, seed)
    batch = random_batch(SCHEMA, 4, seed=seed)
    name, row, user, ts = _t_token(batch, pick)
    realtime = {}
    changed = 0
    for rt_name, seq in batch.realtime.items():
        lo, hi = int(seq.offsets[user]), int(seq.offsets[user + 1])
        rows = torch.arange(lo, hi)[seq.timestamps[lo:hi] >= ts]
        changed += rows.numel()
        realtime[rt_name] = SequenceBatch(seq.offsets, seq.timestamps, _redraw(seq.features, rows, seed + 1))
    assume(changed > 0)  # only examples where the user has R-tokens at or after the exposure
    altered = dataclasses.replace(batch, realtime=realtime)
    before, after = model(batch), model(altered)
    assert torch.equal(before.target_embeddings[name][row], after.target_embeddings[name][row])
    assert torch.equal(before.logits[name][row], after.logits[name][row])


@settings(max_examples=15, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), pick=st.integers(0, 1000))
def test_no_leakage_from_other_target_tokens(config, seed, pick):
    model = _model(config, seed)
    batch = random_batch(SCHEMA, 4, seed=seed)
    name, row, _, _ = _t_token(batch, pick)
    scenarios = {}
    for s, sc in batch.scenarios.items():
        rows = torch.tensor([r for r in range(sc.num_rows) if not (s == name and r == row)], dtype=torch.long)
        scenarios[s] = dataclasses.replace(
            sc, user=_redraw(sc.user, rows, seed + 1), cross=_redraw(sc.cross, rows, seed + 2), item=_redraw(sc.item, rows, seed + 3)
        )
    before, after = model(batch), model(dataclasses.replace(batch, scenarios=scenarios))
    assert torch.equal(before.target_embeddings[name][row], after.target_embeddings[name][row])
    assert torch.equal(before.logits[name][row], after.logits[name][row])


@settings(max_examples=15, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000))
def test_target_permutation_equivariance(config, seed):
    model = _model(config, seed)
    batch = random_batch(SCHEMA, 4, seed=seed)
    out = model(batch)
    g = torch.Generator().manual_seed(seed)
    permuted, orders = batch, {}
    for name, sc in batch.scenarios.items():
        order = torch.cat([lo + torch.randperm(hi - lo, generator=g)
                           for lo, hi in zip(sc.offsets[:-1].tolist(), sc.offsets[1:].tolist())] or [torch.zeros(0, dtype=torch.long)])
        orders[name] = order
        permuted = reorder_scenario_rows(permuted, name, order)
    out_p = model(permuted)
    for name, order in orders.items():
        torch.testing.assert_close(out_p.logits[name], out.logits[name][order], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_p.target_embeddings[name], out.target_embeddings[name][order], rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), size=st.integers(2, 6))
def test_batch_independence_user_scored_alone_equals_user_in_batch(config, seed, size):
    model = _model(config, seed)
    batch = random_batch(SCHEMA, size, seed=seed)
    full = model(batch)
    for user in range(size):
        alone = model(select_users(batch, [user]))
        for name, sc in batch.scenarios.items():
            lo, hi = int(sc.offsets[user]), int(sc.offsets[user + 1])
            torch.testing.assert_close(alone.logits[name], full.logits[name][lo:hi], rtol=1e-5, atol=1e-6)
    # Micro-batches in another order give the same scores too.
    order = list(range(size))[::-1]
    reordered = model(select_users(batch, order))
    for name, sc in batch.scenarios.items():
        rows = torch.cat([torch.arange(int(sc.offsets[u]), int(sc.offsets[u + 1])) for u in order])
        torch.testing.assert_close(reordered.logits[name], full.logits[name][rows], rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000))
def test_subgraph_matches_full_model(config, seed):
    model = _model(config, seed)
    batch = random_batch(SCHEMA, 4, seed=seed)
    full = model(batch)
    for name in SCHEMA.scenario_names:
        sub = model.scenario_subgraph(name)
        out = sub(restrict_batch(batch, [name]))
        assert list(out.logits) == [name]
        torch.testing.assert_close(out.logits[name], full.logits[name], rtol=1e-5, atol=1e-6)


def test_subgraph_holds_only_its_scenarios_modules_and_shares_weights():
    model = _model(tiny_config(), 0)
    sub = model.scenario_subgraph("food")
    keys = list(sub.state_dict())
    for other in ("feed", "coupon"):
        assert not [k for k in keys if other in k], f"subgraph of 'food' carries {other} weights"
    assert any("scenario_tokenizers.food" in k for k in keys)
    full_params = {id(p) for p in model.parameters()}
    assert all(id(p) in full_params for p in sub.parameters())
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="does not know"):
        sub(random_batch(SCHEMA, 2, seed=0))  # a batch that still holds the other scenarios


@pytest.mark.parametrize("backend", ["reference", "jagged"])
@pytest.mark.parametrize("hta", ["(1:1)x2", "(2:0)x1", "(0:2)x1"])
def test_every_parameter_the_forward_uses_receives_a_gradient(backend, hta):
    config = tiny_config(attention_backend=backend, relative_time_bias=True, relative_position_bias=True,
                         num_heads=4, num_kv_groups=2).with_hta(hta)
    model = _model(config, 1).train()
    batch = random_batch(SCHEMA, 6, seed=2)
    for name, sc in batch.scenarios.items():
        assert sc.num_rows > 0, f"test batch must hold every scenario ({name} is empty)"
    model.loss(batch, model(batch)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    dense_zero = [n for n, p in model.named_parameters() if "embeddings.tables" not in n and not p.grad.abs().sum() > 0]
    assert not dense_zero, f"parameters with an all-zero gradient: {dense_zero}"


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), bias=st.booleans(), hg=st.sampled_from([(2, 1), (4, 2)]))
def test_reference_and_jagged_backends_agree_through_the_model_forward_and_backward(seed, bias, hg):
    cfg = tiny_config(relative_time_bias=bias, relative_position_bias=bias, num_heads=hg[0], num_kv_groups=hg[1],
                      target_layers_per_block=2)
    ref = _model(cfg.model_copy(update={"attention_backend": "reference"}), seed).double()
    jag = _model(cfg, seed).double()
    jag.load_state_dict(ref.state_dict())
    batch = random_batch(SCHEMA, 4, seed=seed)
    out_r, out_j = ref(batch), jag(batch)
    for name in out_r.logits:
        torch.testing.assert_close(out_j.logits[name], out_r.logits[name], rtol=1e-9, atol=1e-10)
    ref.loss(batch, out_r).backward()
    jag.loss(batch, out_j).backward()
    for (n, pr), (_, pj) in zip(ref.named_parameters(), jag.named_parameters()):
        torch.testing.assert_close(pj.grad, pr.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{n}: {m}")


def test_model_accepts_batches_with_a_subset_of_scenarios_or_empty_ones():
    model = _model(tiny_config(), 0)
    batch = random_batch(SCHEMA, 4, seed=5)
    full = model(batch)
    # A scenario with zero rows gives an empty [0, tasks] output.
    empty = random_batch(SCHEMA, 3, seed=6, lengths={"coupon": [0, 0, 0]})
    out = model(empty)
    assert out.logits["coupon"].shape == (0, 2)
    # A batch holding only two scenarios: those scenarios' scores do not change.
    pair = model(restrict_batch(batch, ["feed", "food"]))
    assert list(pair.logits) == ["feed", "food"]
    for name in pair.logits:
        torch.testing.assert_close(pair.logits[name], full.logits[name], rtol=1e-5, atol=1e-6)
    # A model built for one scenario (single-scenario training) runs on that scenario's batch.
    single = MTFM(SCHEMA.restrict(["coupon"]), tiny_config()).eval()
    assert single(restrict_batch(batch, ["coupon"])).logits["coupon"].shape == (batch.scenarios["coupon"].num_rows, 2)


@pytest.mark.parametrize("weighting", ["exposure", "task_mean"])
def test_loss_is_the_sum_over_tasks_of_the_bce_over_observed_labels_normalised_as_configured(weighting):
    model = _model(tiny_config(loss_weighting=weighting), 0)
    batch = random_batch(SCHEMA, 6, seed=8)
    out = model(batch)
    exposures = sum(sc.num_rows for sc in batch.scenarios.values())
    expected = torch.zeros(())
    for name, sc in batch.scenarios.items():
        for j in range(sc.labels.shape[1]):
            seen = sc.label_mask[:, j]
            if seen.any():
                p = torch.sigmoid(out.logits[name][seen, j])
                y = sc.labels[seen, j]
                bce = -(y * p.log() + (1 - y) * (1 - p).log())
                expected = expected + (bce.sum() / exposures if weighting == "exposure" else bce.mean())
    torch.testing.assert_close(model.loss(batch, out), expected, rtol=1e-5, atol=1e-6)
    # Unobserved labels do not matter, whatever their value.
    flipped = {n: dataclasses.replace(sc, labels=torch.where(sc.label_mask, sc.labels, 1 - sc.labels))
               for n, sc in batch.scenarios.items()}
    torch.testing.assert_close(model.loss(dataclasses.replace(batch, scenarios=flipped), out), model.loss(batch, out))


def test_both_loss_weightings_agree_on_a_single_scenario_batch_with_every_label_observed():
    batch = restrict_batch(random_batch(SCHEMA, 5, seed=10), ["food"])
    sc = batch.scenarios["food"]
    batch = dataclasses.replace(batch, scenarios={"food": dataclasses.replace(sc, label_mask=torch.ones_like(sc.label_mask))})
    by_exposure = _model(tiny_config(loss_weighting="exposure"), 0)
    by_task = _model(tiny_config(loss_weighting="task_mean"), 0)
    out = by_exposure(batch)
    torch.testing.assert_close(by_exposure.loss(batch, out), by_task.loss(batch, out), rtol=1e-6, atol=1e-7)
    # With several scenarios they differ: the small scenario's tasks weigh less per task under "exposure".
    full = random_batch(SCHEMA, 6, seed=8)
    out = by_exposure(full)
    assert not torch.allclose(by_exposure.loss(full, out), by_task.loss(full, out))


def test_bad_batches_fail_with_messages_naming_field_feature_and_row():
    model = _model(tiny_config(), 0)
    batch = random_batch(SCHEMA, 3, seed=9)
    sc = batch.scenarios["food"]
    ids = sc.item.categorical["dish_type"].clone()
    ids[1] = 99
    bad = dataclasses.replace(batch, scenarios={**batch.scenarios, "food": dataclasses.replace(
        sc, item=dataclasses.replace(sc.item, categorical={**sc.item.categorical, "dish_type": ids}))})
    with pytest.raises(ValueError, match=r"scenario 'food' item features: feature 'dish_type': id 99 at row 1 is outside \[0, 5\)"):
        model(bad)
    seq = batch.history["clicks"]
    dwell = seq.features.numeric["dwell"].clone()
    dwell[0] = float("nan")
    bad = dataclasses.replace(batch, history={**batch.history, "clicks": SequenceBatch(
        seq.offsets, seq.timestamps, dataclasses.replace(seq.features, numeric={"dwell": dwell}))})
    with pytest.raises(ValueError, match=r"history sequence 'clicks': numeric feature 'dwell' is nan at row 0"):
        model(bad)
    missing = dataclasses.replace(batch, history={**batch.history, "clicks": SequenceBatch(
        seq.offsets, seq.timestamps, dataclasses.replace(seq.features, numeric={}))})
    with pytest.raises(ValueError, match=r"history sequence 'clicks'.*missing \['dwell'\]"):
        model(missing)
    other = MTFM(SCHEMA.restrict(["feed"]), tiny_config())
    with pytest.raises(ValueError, match=r"token groups \['T:food', 'T:coupon'\]"):
        other(batch)
