"""Store and loader: JaggedBatch round trip, determinism, resume, ranks, scenario filter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_world import WorldSize, tiny_world
from mtfm.data.aggregate import prepare
from mtfm.data.batch import TOKEN_T, JaggedBatch, build_token_layout
from mtfm.data.loader import BatchLoader, table_to_batch
from mtfm.data.store import MANIFEST_NAME, format_summary, read_manifest, sample_columns


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    raw = tiny_world(11, WorldSize(users=20, exposures_a=200, exposures_b=100, windows=8))
    manifest = prepare(raw, out, shards=3, oracle_splits=("train", "valid", "test"))
    return out, raw, manifest


def _sample_keys(batch: JaggedBatch) -> list[tuple[int, int]]:
    return list(zip(batch.user_ids.tolist(), batch.window_start.tolist()))


def _flat(batch: JaggedBatch) -> dict[str, list]:
    """Every tensor of a batch, as lists keyed by a path (for equality checks)."""
    out = {"user": batch.user_ids.tolist(), "window": batch.window_start.tolist()}
    for kind in ("history", "realtime"):
        for name, seq in getattr(batch, kind).items():
            out[f"{kind}.{name}.offsets"] = seq.offsets.tolist()
            out[f"{kind}.{name}.ts"] = seq.timestamps.tolist()
            for f, t in {**seq.features.categorical, **seq.features.numeric}.items():
                out[f"{kind}.{name}.{f}"] = t.tolist()
    for name, sc in batch.scenarios.items():
        out[f"T.{name}.offsets"] = sc.offsets.tolist()
        out[f"T.{name}.ts"] = sc.timestamps.tolist()
        out[f"T.{name}.labels"] = sc.labels.tolist()
        out[f"T.{name}.mask"] = sc.label_mask.tolist()
        for g in ("user", "cross", "item"):
            ft = getattr(sc, g)
            for f, t in {**ft.categorical, **ft.numeric}.items():
                out[f"T.{name}.{g}.{f}"] = t.tolist()
            for f, (v, o) in ft.multi.items():
                out[f"T.{name}.{g}.{f}"] = (v.tolist(), o.tolist())
    out["layout.groups"] = batch.layout.group_ids.tolist()
    return out


def test_jagged_batch_round_trip_matches_the_stored_rows(prepared) -> None:
    out, raw, manifest = prepared
    schema = manifest.schema_obj
    tables = [pq.read_table(p) for p in manifest.shard_paths(out, "train")]
    rows = [r for t in tables for r in t.to_pylist()]
    loader = BatchLoader(out, "train", 7, shuffle=False, seed=0)
    batches = list(loader)
    assert sum(b.batch_size for b in batches) == len(rows) == manifest.splits["train"].samples
    assert len(batches) == loader.num_batches(0)
    i = 0
    for batch in batches:
        for b in range(batch.batch_size):
            row = rows[i]
            i += 1
            assert (int(batch.user_ids[b]), int(batch.window_start[b])) == (row["user_id"], row["window_start"])
            for h in schema.history:
                seq = batch.history[h.name]
                lo, hi = int(seq.offsets[b]), int(seq.offsets[b + 1])
                assert seq.timestamps[lo:hi].tolist() == row[f"H.{h.name}.ts"]
                assert seq.features.categorical["item"][lo:hi].tolist() == row[f"H.{h.name}.item"]
            sc = batch.scenarios["A"]
            lo, hi = int(sc.offsets[b]), int(sc.offsets[b + 1])
            assert sc.timestamps[lo:hi].tolist() == row["T.A.ts"]
            assert sc.item.numeric["price"][lo:hi].tolist() == pytest.approx(row["T.A.item.price"])
            v, o = sc.item.multi["tags"]
            per_row = [v[int(o[k]):int(o[k + 1])].tolist() for k in range(lo, hi)]
            assert per_row == row["T.A.item.tags"]
            stored = row["T.A.label.ctcvr"]
            assert sc.label_mask[lo:hi, 1].tolist() == [x >= 0 for x in stored]
            assert sc.labels[lo:hi, 1].tolist() == [float(x == 1) for x in stored]
            assert sc.oracle[lo:hi, 0].tolist() == pytest.approx(row["T.A.oracle.ctr"])
            assert torch.isnan(sc.oracle[lo:hi, 1]).all()  # ctcvr has no oracle column
    assert i == len(rows)
    # The layout is the one build_token_layout gives, with one T-token per exposure.
    last = batches[-1]
    ref = build_token_layout(last.history, last.realtime, last.scenarios, last.batch_size)
    assert torch.equal(ref.group_ids, last.layout.group_ids)
    assert int((last.layout.token_type == TOKEN_T).sum()) == last.num_exposures


def test_contiguous_batches_share_memory_with_arrow(prepared) -> None:
    out, _, manifest = prepared
    table = pq.read_table(manifest.shard_paths(out, "train")[0]).slice(1, 3)
    batch = table_to_batch(table, manifest.schema_obj)
    column = table.column("H.clicks.ts").chunk(0)
    first = int(column.offsets[0].as_py())
    values = column.values
    assert batch.history["clicks"].timestamps.data_ptr() == values.buffers()[1].address + (values.offset + first) * 8
    assert batch.history["clicks"].offsets[0] == 0


def test_shuffled_order_is_deterministic_per_seed_and_epoch_and_covers_each_sample_once(prepared) -> None:
    out, _, manifest = prepared
    def keys(seed, epoch, prefetch=2):
        loader = BatchLoader(out, "train", 5, shuffle=True, seed=seed, prefetch=prefetch)
        return [k for b in loader.iterate(epoch) for k in _sample_keys(b)]

    a = keys(1, 0)
    assert a == keys(1, 0, prefetch=0)
    assert a != keys(1, 1) and a != keys(2, 0)
    assert sorted(a) == sorted(keys(1, 1))
    assert len(a) == len(set(a)) == manifest.splits["train"].samples


def test_start_batch_resumes_the_stream_exactly(prepared) -> None:
    out, _, _ = prepared
    loader = BatchLoader(out, "train", 4, shuffle=True, seed=3)
    full = [_flat(b) for b in loader.iterate(2)]
    assert [_flat(b) for b in loader.iterate(2, start_batch=5)] == full[5:]
    assert list(loader.iterate(2, start_batch=len(full))) == []


def test_each_rank_reads_its_own_shards(prepared) -> None:
    out, _, manifest = prepared
    per_rank = [[k for b in BatchLoader(out, "train", 8, shuffle=True, seed=0, rank=r, world_size=3) for k in
                 _sample_keys(b)] for r in range(3)]
    assert all(per_rank)
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == manifest.splits["train"].samples
    with pytest.raises(ValueError, match="3 shard\\(s\\) for 4 ranks"):
        BatchLoader(out, "train", 8, shuffle=False, seed=0, rank=0, world_size=4)


def test_scenario_filter_keeps_only_those_exposures_and_counts_skipped_samples(prepared) -> None:
    out, _, manifest = prepared
    loader = BatchLoader(out, "train", 6, shuffle=False, seed=0, scenarios=["B"])
    batches = list(loader)
    assert all(list(b.scenarios) == ["B"] for b in batches)
    assert sum(b.num_exposures for b in batches) == manifest.splits["train"].scenario_exposures["B"]
    assert all(bool((torch.diff(b.scenarios["B"].offsets) > 0).all()) for b in batches)
    assert loader.skipped_samples == manifest.splits["train"].samples - loader.num_samples > 0
    groups = loader.schema.token_groups()
    assert groups[-1] == "T:B" and max(int(b.layout.group_ids.max()) for b in batches) == len(groups) - 1
    with pytest.raises(KeyError, match="unknown scenario"):
        BatchLoader(out, "train", 6, shuffle=False, seed=0, scenarios=["nope"])


def test_stopping_early_ends_the_prefetch_thread(prepared) -> None:
    import threading

    out, _, _ = prepared
    loader = BatchLoader(out, "train", 2, shuffle=True, seed=0, prefetch=1)
    it = loader.iterate(0)
    next(it)
    it.close()
    assert not any(t.name.startswith("mtfm-loader") for t in threading.enumerate())


def test_manifest_round_trip_accounting_and_summary(prepared) -> None:
    out, raw, manifest = prepared
    again = read_manifest(out)
    assert again == manifest
    assert again.input_exposures == again.output_exposures + sum(again.dropped.values())
    assert again.schema_obj == raw.schema
    assert sum(s.samples for s in again.splits.values()) == again.samples
    for info in again.splits.values():
        assert sum(s.samples for s in info.shards) == info.samples
        assert sum(s.exposures for s in info.shards) == info.exposures
        assert len(info.shards) == 3
        for s in info.shards:
            assert pq.read_table(out / s.path).column_names == sample_columns(again.schema_obj)
    json.loads((out / MANIFEST_NAME).read_text())  # strict JSON (no NaN)
    text = format_summary(again)
    assert "drop reasons" in text and "oracle ceiling" in text and "valid_start" in text
    assert again.oracle["train"]["A"]["ctr"]["exposures"] == again.splits["train"].scenario_exposures["A"]
    # Per-split label rates recombine into the scenario's rate.
    for name, info in again.scenarios.items():
        for task, rate in info.label_rates.items():
            per_split = [(s.label_rates[name][task], s.scenario_exposures[name]) for s in again.splits.values()]
            if name == "B" or task == "ctr":  # every label observed: rates weight by exposures
                assert rate == pytest.approx(sum(r * n for r, n in per_split if r is not None) / info.exposures)


def test_missing_manifest_names_the_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        BatchLoader(tmp_path, "train", 1, shuffle=False, seed=0)


def test_label_matrix_and_timestamps_have_model_dtypes(prepared) -> None:
    out, _, _ = prepared
    batch = next(iter(BatchLoader(out, "valid", 16, shuffle=False, seed=0)))
    sc = batch.scenarios["A"]
    assert sc.labels.dtype == torch.float32 and sc.label_mask.dtype == torch.bool
    assert sc.timestamps.dtype == torch.int64 and sc.offsets.dtype == torch.int64
    assert sc.item.categorical["item"].dtype == torch.int64
    assert sc.item.numeric["price"].dtype == torch.float32
    assert np.all(sc.item.categorical["item"].numpy() < 97)  # hash buckets
