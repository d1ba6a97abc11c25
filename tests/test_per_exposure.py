"""Aggregated samples vs one sample per exposure (mtfm.data.per_exposure, issue 13).

On real prepared batches: the conversion keeps every exposure once, each with its own user's
sequences; the real model (small preset) gives the same logits on both forms (exact for the
``window`` and ``past`` views, not for ``view``, and not when a sample gets another user's
sequences: the comparison can fail); the store-format tables read back through the loader
give the same logits; the benchmark runs in a tiny configuration.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtfm.data.aggregate import prepare
from mtfm.data.batch import TOKEN_R, TOKEN_T, JaggedBatch, SequenceBatch, build_token_layout
from mtfm.data.loader import BatchLoader, LoadedShard
from mtfm.data.per_exposure import exposure_users, per_exposure_batch, shard_tables, stored_types
from mtfm.data.sources.synthetic import load_source
from mtfm.model import MTFM
from mtfm.model.batch_ops import select_users
from mtfm.model.config import load_model_config
from mtfm.model.mask import visible

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("agg")
    prepare(load_source(None, None, 60, 0), out, shards=1, oracle_splits=())
    loader = BatchLoader(out, "train", 12, shuffle=False, seed=0, prefetch=0)
    torch.manual_seed(0)
    model = MTFM(loader.schema, load_model_config("small")).eval()
    return out, loader, _batch_with_expired_actions(loader), model


def _batch_with_expired_actions(loader: BatchLoader) -> JaggedBatch:
    """The first batch in which some exposure's R view is smaller than its past (an action
    expired by the ``max_len`` rule): there the three views differ."""
    for batch in loader:
        views = [per_exposure_batch(batch, v) for v in ("past", "view")]
        if sum(s.num_rows for s in views[1].realtime.values()) < sum(s.num_rows for s in views[0].realtime.values()):
            return batch
    raise AssertionError("no batch with an expired real-time action; the world changed?")


def _rows(seq: SequenceBatch, b: int) -> slice:
    return slice(int(seq.offsets[b]), int(seq.offsets[b + 1]))


def _features_equal(seq: SequenceBatch, rows: slice, other: SequenceBatch, other_rows: torch.Tensor | slice) -> None:
    torch.testing.assert_close(seq.timestamps[rows], other.timestamps[other_rows], rtol=0, atol=0)
    for name, values in seq.features.categorical.items():
        torch.testing.assert_close(values[rows], other.features.categorical[name][other_rows], rtol=0, atol=0)
    for name, values in seq.features.numeric.items():
        torch.testing.assert_close(values[rows], other.features.numeric[name][other_rows], rtol=0, atol=0)


@pytest.mark.parametrize("view", ["window", "past", "view"])
def test_every_exposure_once_with_its_own_users_sequences(world, view):
    _, _, batch, _ = world
    pe = per_exposure_batch(batch, view)
    users = exposure_users(batch)
    assert pe.batch_size == batch.num_exposures == users.shape[0]
    assert torch.equal(pe.user_ids, batch.user_ids[users])
    per_sample = sum(sc.offsets[1:] - sc.offsets[:-1] for sc in pe.scenarios.values())
    assert torch.equal(per_sample, torch.ones(pe.batch_size, dtype=torch.long))  # one exposure per sample
    for name, sc in batch.scenarios.items():  # each exposure once, in its stored order, data unchanged
        out = pe.scenarios[name]
        for attr in ("timestamps", "labels", "label_mask", "source_row"):
            assert torch.equal(getattr(out, attr), getattr(sc, attr)), (name, attr)
        for key, values in sc.item.categorical.items():
            assert torch.equal(out.item.categorical[key], values)
    t_time = pe.layout.timestamps[pe.layout.token_type == TOKEN_T]  # one T-token per sample, in sample order
    for i in range(pe.batch_size):
        u = int(users[i])
        for name, seq in batch.history.items():
            _features_equal(pe.history[name], _rows(pe.history[name], i), seq, _rows(seq, u))
        for name, seq in batch.realtime.items():
            mine = torch.arange(_rows(seq, u).start, _rows(seq, u).stop)
            if view == "past":
                mine = mine[seq.timestamps[mine] < t_time[i]]
            elif view == "view":
                pos = torch.tensor(-1)  # a query position no key has
                is_r = torch.full_like(mine, TOKEN_R)
                mine = mine[visible(t_time[i], pos, is_r, seq.timestamps[mine], seq.expiry[mine], mine)]
            _features_equal(pe.realtime[name], _rows(pe.realtime[name], i), seq, mine)
            assert torch.equal(pe.realtime[name].expiry[_rows(pe.realtime[name], i)], seq.expiry[mine])


def _max_diff(a, b) -> float:
    return max(float((a.logits[s] - b.logits[s]).abs().max()) for s in a.logits if a.logits[s].numel())


def _with_history_of(pe: JaggedBatch, donors: list[int]) -> JaggedBatch:
    """``pe`` with sample i's history sequences replaced by sample donors[i]'s (a data change)."""
    history = select_users(pe, donors).history
    layout = build_token_layout(history, pe.realtime, pe.scenarios, pe.batch_size)
    return dataclasses.replace(pe, history=history, layout=layout)


def test_real_model_gives_the_same_logits_on_both_forms(world):
    _, _, batch, model = world
    with torch.no_grad():
        agg = model(batch)
        for view in ("window", "past"):
            pe = per_exposure_batch(batch, view)
            out = model(pe)
            assert _max_diff(out, agg) <= 1e-5, view
            torch.testing.assert_close(model.loss(pe, out), model.loss(batch, agg), rtol=1e-6, atol=1e-6)
        # The comparison can fail: the request-shaped view drops R context the full layers read ...
        assert _max_diff(model(per_exposure_batch(batch, "view")), agg) > 1e-4
        # ... and another user's history changes the logits of the samples that get it (well
        # beyond the tolerance above), and only theirs.
        pe = per_exposure_batch(batch, "past")
        users = exposure_users(batch)
        donors = torch.roll(torch.arange(pe.batch_size), 1)
        moved = _with_history_of(pe, donors.tolist())
        changed = users[donors] != users
        out = model(moved)
        diffs = torch.cat([(out.logits[s] - agg.logits[s]).abs().amax(dim=1) for s in agg.logits])
        per_sample = diffs[_scenario_major(pe)]
        assert changed.any() and float(per_sample[changed].max()) > 1e-3
        assert float(per_sample[~changed].max()) <= 1e-5


def _scenario_major(pe: JaggedBatch) -> torch.Tensor:
    """Per sample, its row in the scenario-major concatenation of the logits."""
    sample_of_row = torch.cat([torch.nonzero(sc.offsets[1:] > sc.offsets[:-1]).flatten()
                               for sc in pe.scenarios.values()])
    return torch.argsort(sample_of_row)


def test_store_format_tables_read_back_through_the_loader(world):
    out_dir, loader, batch, model = world
    types = stored_types(out_dir / loader.manifest.splits["train"].shards[0].path, loader.schema)
    with torch.no_grad():
        agg = model(batch)
        for form in (batch, per_exposure_batch(batch, "past")):
            tables = shard_tables(form, loader.schema, types)
            assert [t.num_rows for t in tables.sequences.values()] == [
                s.num_rows for s in (*form.history.values(), *form.realtime.values())]
            back = LoadedShard(tables, loader.schema, "written").batch(np.arange(form.batch_size))
            assert back.num_exposures == batch.num_exposures
            assert _max_diff(model(back), agg) <= 1e-5


def test_benchmark_runs_in_a_tiny_configuration(world, tmp_path):
    out_dir, _, _, _ = world
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_aggregation.py"), "--data", str(out_dir),
           "--batch-size", "3", "--batches", "1", "--rounds", "2", "--storage-batch-size", "64",
           "--json", str(tmp_path / "out.json")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "| per-exposure, same exposures |" in run.stdout and "| per-exposure (past) |" in run.stdout
    assert (tmp_path / "out.json").is_file()
