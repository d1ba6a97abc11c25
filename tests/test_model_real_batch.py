"""The model on batches from the real data layer (synthetic source -> prepare -> BatchLoader)."""

from __future__ import annotations

import pytest
import torch

from mtfm.data.aggregate import prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.sources.synthetic import load_source
from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch, select_users
from mtfm.model.testing import tiny_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    prepare(load_source(None, None, 60, 0), out, shards=1, oracle_splits=())
    loader = BatchLoader(out, "train", 12, shuffle=False, seed=0, prefetch=0)
    return out, loader.schema, next(iter(loader))


def test_model_scores_every_exposure_of_a_loader_batch_and_trains(prepared):
    _, schema, batch = prepared
    config = tiny_config(relative_time_bias=True, relative_position_bias=True)
    model = MTFM(schema, config)
    out = model(batch)
    assert list(out.logits) == list(batch.scenarios)
    for name, sc in batch.scenarios.items():
        assert out.logits[name].shape == sc.labels.shape
    loss = model.loss(batch, out)
    assert torch.isfinite(loss)
    loss.backward()
    # Backends agree on real data too (float64, so the comparison is tight).
    ref = MTFM(schema, config.model_copy(update={"attention_backend": "reference"})).double().eval()
    jag = MTFM(schema, config).double().eval()
    jag.load_state_dict(ref.state_dict())
    a, b = ref(batch), jag(batch)
    for name in a.logits:
        torch.testing.assert_close(b.logits[name], a.logits[name], rtol=1e-9, atol=1e-10)


def test_subgraphs_and_micro_batches_match_the_full_model_on_a_loader_batch(prepared):
    _, schema, batch = prepared
    torch.manual_seed(0)
    model = MTFM(schema, tiny_config(relative_time_bias=True)).eval()
    full = model(batch)
    for name in schema.scenario_names:
        out = model.scenario_subgraph(name)(restrict_batch(batch, [name]))
        torch.testing.assert_close(out.logits[name], full.logits[name], rtol=1e-5, atol=1e-6)
    half = batch.batch_size // 2
    parts = [model(select_users(batch, list(range(half)))), model(select_users(batch, list(range(half, batch.batch_size))))]
    for name in schema.scenario_names:
        joined = torch.cat([p.logits[name] for p in parts])
        torch.testing.assert_close(joined, full.logits[name], rtol=1e-5, atol=1e-6)


def test_single_scenario_model_runs_on_the_loaders_scenario_filter(prepared):
    out_dir, schema, _ = prepared
    name = schema.scenario_names[-1]
    loader = BatchLoader(out_dir, "train", 12, shuffle=False, seed=0, prefetch=0, scenarios=[name])
    batch = next(iter(loader))
    model = MTFM(loader.schema, tiny_config())
    out = model(batch)
    assert list(out.logits) == [name]
    model.loss(batch, out).backward()
