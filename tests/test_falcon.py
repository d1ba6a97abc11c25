"""M-Falcon equals the plain forward: one pass over the whole request, each candidate alone, and
any micro-batch size over one cached prefix (float64, every addition on and off)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch, take_candidates
from mtfm.model.testing import BatchShape, random_batch, tiny_config, tiny_schema
from mtfm.serve.falcon import compute_prefix, score_candidates

SCHEMA = tiny_schema()
SCENARIO = SCHEMA.scenario_names[0]


def _model(additions: bool, hta: str, backend: str) -> MTFM:
    torch.manual_seed(0)
    config = tiny_config(relative_time_bias=additions, relative_position_bias=additions, final_norm=additions,
                         content_match=additions, attention_backend=backend).with_hta(hta)
    model = MTFM(SCHEMA, config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gln" in name or "_bias" in name or "norm" in name or "match_scale" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _request(seed: int, candidates: int):
    shape = BatchShape(history=8, realtime=7, exposures=candidates)
    batch = random_batch(SCHEMA, 1, seed=seed, shape=shape, lengths={SCENARIO: [candidates]})
    return restrict_batch(batch, [SCENARIO])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), candidates=st.integers(1, 12), micro=st.integers(1, 13),
       additions=st.booleans(), hta=st.sampled_from(["(1:1)x2", "(2:1)x1", "(0:2)x1", "(2:0)x1"]),
       backend=st.sampled_from(["reference", "jagged"]))
def test_micro_batches_over_a_cached_prefix_equal_one_forward_pass(seed, candidates, micro, additions, hta, backend):
    model = _model(additions, hta, backend)
    batch = _request(seed, candidates)
    with torch.no_grad():
        full = model(batch).logits[SCENARIO]
    prefix = compute_prefix(model, batch)
    torch.testing.assert_close(score_candidates(model, batch, prefix, micro)[SCENARIO], full, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(score_candidates(model, batch)[SCENARIO], full, atol=1e-10, rtol=1e-10)


def test_each_candidate_alone_scores_as_in_the_whole_request_and_the_subgraph_agrees():
    model = _model(True, "(3:1)x2", "jagged")
    batch = _request(3, 9)
    prefix = compute_prefix(model, batch)
    falcon = score_candidates(model, batch, prefix, micro_batch=4)[SCENARIO]
    with torch.no_grad():
        for i in range(9):
            alone = model(take_candidates(batch, SCENARIO, torch.tensor([i]))).logits[SCENARIO][0]
            torch.testing.assert_close(falcon[i], alone, atol=1e-10, rtol=1e-10)
    sub = model.scenario_subgraph(SCENARIO)
    torch.testing.assert_close(score_candidates(sub, batch, compute_prefix(sub, batch), 2)[SCENARIO], falcon,
                               atol=1e-10, rtol=1e-10)


def test_the_prefix_is_the_requests_and_bad_arguments_are_named():
    model = _model(False, "(1:1)x1", "jagged")
    batch = _request(1, 4)
    prefix = compute_prefix(model, batch)
    assert len(prefix.kv) == 2 and prefix.nbytes > 0
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        score_candidates(model, batch, prefix, 0)
    other = _request(2, 4)
    if compute_prefix(model, other).num_tokens != prefix.num_tokens:
        with pytest.raises(ValueError, match="context tokens"):
            score_candidates(model, other, prefix)
    two_users = random_batch(SCHEMA, 2, seed=0)
    with pytest.raises(ValueError, match="one request"):
        compute_prefix(model, two_users)
