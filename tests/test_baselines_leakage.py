"""No baseline sees the future either: the leakage test of MTFM (tests/test_leakage.py), run
on every baseline of the comparison.

The same raw-table changes (flip the exposure's own labels, add or remove later actions, add,
remove or relabel other exposures of its window), the real aggregation and loader, the real
model: the target exposure's logits must not move. A baseline that pooled an action at or
after its exposure, or let one exposure see another, would win the comparison by cheating.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_leakage import CHANGES, _pick_target, _scorer, changed_batches, leak_schema, score

from mtfm.train.models import BASELINES, build_model

ARCHS = sorted(BASELINES)


@lru_cache(maxsize=None)
def baseline(arch: str) -> torch.nn.Module:
    """The baseline at its defaults, weights drawn away from init, float64, eval mode."""
    torch.manual_seed(0)
    model = build_model(arch, {}, leak_schema())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.double().eval()


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 3), pick=st.integers(0, 10**6), changes=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3))
def test_a_baselines_logits_ignore_its_labels_later_actions_and_other_exposures(arch, seed, pick, changes) -> None:
    target, original, edited = changed_batches(seed, pick, changes)
    model = baseline(arch)
    before = score(model, *original, target.scenario)
    after = score(model, *edited, target.scenario)
    # rtol: the perturbed weights make some logits ~1e9 (DCNv2's cross layers multiply); a batch
    # with more rows regroups float64 sums (~1e-16 relative), a leak moves logits by far more
    torch.testing.assert_close(after, before, atol=1e-10, rtol=1e-12,
                               msg=lambda m: f"{arch} {[c.__name__ for c in changes]} {target}: {m}")


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "logistic"])
def test_a_baseline_does_read_earlier_behaviour(arch) -> None:
    """The control: the same harness sees a change that is allowed to matter (every earlier action
    of the target's user removed), so the test above cannot pass by reading nothing."""
    raw, scorer = _scorer(0)
    target = _pick_target(raw, np.random.default_rng(0))
    changed = dict(raw.tables)
    for name in _behaviour_tables(raw):
        df = changed[name]
        changed[name] = df.filter(~((df["user_id"] == target.user) & (df["ts"] < target.ts)))
    model = baseline(arch)
    before = score(model, *scorer.batch(raw.tables, target), target.scenario)
    after = score(model, *scorer.batch(changed, target), target.scenario)
    assert not torch.allclose(before, after, atol=1e-8, rtol=0), f"{arch} ignores the user's earlier behaviour"


def _behaviour_tables(raw) -> list[str]:
    return sorted({s.table for s in [*raw.schema.history, *raw.schema.realtime]})
