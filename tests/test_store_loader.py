"""Store and loader: JaggedBatch round trip, determinism, resume, ranks, scenario filter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_world import WorldSize, tiny_schema_dict, tiny_world

from mtfm.config import schema_from_dict
from mtfm.data.aggregate import prepare
from mtfm.data.batch import TOKEN_T, JaggedBatch, build_token_layout
from mtfm.data.loader import BatchLoader, LoadedShard
from mtfm.data.store import (
    MANIFEST_NAME,
    format_summary,
    read_manifest,
    read_shard,
    sample_columns,
    sequence_columns,
    sequence_path,
    sequence_types,
)


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


def _stored_samples(out, manifest, split: str) -> list[dict]:
    """A shard's samples in the previous (format 1) shape, built with plain Python from the
    files: each sample's H / R rows copied out of the sequence files by its [start, end)."""
    schema = manifest.schema_obj
    rows = []
    for path in manifest.shard_paths(out, split):
        flat = {prefix: pq.read_table(sequence_path(path, prefix)).to_pydict()
                for prefix, _ in sequence_types(schema)}
        for row in pq.read_table(path).to_pylist():
            for prefix, spec in sequence_types(schema):
                lo, hi = row.pop(f"{prefix}.start"), row.pop(f"{prefix}.end")
                for column in sequence_columns(spec):
                    row[f"{prefix}.{column}"] = flat[prefix][column][lo:hi]
            rows.append(row)
    return rows


def _batch_samples(batch: JaggedBatch, schema) -> list[dict]:
    """Each sample of a batch, sliced out of the batch's tensors by a loop (same shape as
    :func:`_stored_samples`; labels as stored: 1 / 0 / -1)."""
    rows = []
    for b in range(batch.batch_size):
        row = {"user_id": int(batch.user_ids[b]), "window_start": int(batch.window_start[b])}
        for prefix, spec in sequence_types(schema):
            seq = (batch.history if prefix.startswith("H.") else batch.realtime)[spec.name]
            lo, hi = int(seq.offsets[b]), int(seq.offsets[b + 1])
            row[f"{prefix}.ts"] = seq.timestamps[lo:hi].tolist()
            for name, t in {**seq.features.categorical, **seq.features.numeric}.items():
                row[f"{prefix}.{name}"] = t[lo:hi].tolist()
            for name, (v, o) in seq.features.multi.items():
                row[f"{prefix}.{name}"] = [v[int(o[k]):int(o[k + 1])].tolist() for k in range(lo, hi)]
        for spec in schema.scenarios:
            sc, p = batch.scenarios[spec.name], f"T.{spec.name}"
            lo, hi = int(sc.offsets[b]), int(sc.offsets[b + 1])
            row[f"{p}.ts"] = sc.timestamps[lo:hi].tolist()
            row[f"{p}.row"] = sc.source_row[lo:hi].tolist()
            for g in ("user", "cross", "item"):
                ft = getattr(sc, g)
                for name, t in {**ft.categorical, **ft.numeric}.items():
                    row[f"{p}.{g}.{name}"] = t[lo:hi].tolist()
                for name, (v, o) in ft.multi.items():
                    row[f"{p}.{g}.{name}"] = [v[int(o[k]):int(o[k + 1])].tolist() for k in range(lo, hi)]
            for k, task in enumerate(spec.tasks):
                stored = torch.where(sc.label_mask[lo:hi, k], sc.labels[lo:hi, k], -1.0)
                row[f"{p}.label.{task.name}"] = [int(x) for x in stored.tolist()]
                if task.oracle_column is not None:
                    row[f"{p}.oracle.{task.name}"] = sc.oracle[lo:hi, k].tolist()
                else:
                    assert torch.isnan(sc.oracle[lo:hi, k]).all()
        rows.append(row)
    return rows


def _check_dtypes(batch: JaggedBatch) -> None:
    for seq in [*batch.history.values(), *batch.realtime.values()]:
        assert seq.offsets.dtype == seq.timestamps.dtype == torch.int64
        assert all(t.dtype == torch.int64 for t in seq.features.categorical.values())
        assert all(t.dtype == torch.float32 for t in seq.features.numeric.values())


@pytest.mark.parametrize("shuffle", [False, True])
def test_loaded_batches_equal_the_samples_stored_one_by_one(prepared, shuffle) -> None:
    """The vectorised gather gives, per sample, exactly the rows of its stored ranges (the
    JaggedBatch of the one-row-per-sample layout), in any order and across shard borders."""
    out, _, manifest = prepared
    schema = manifest.schema_obj
    stored = _stored_samples(out, manifest, "train")
    by_key = {(r["user_id"], r["window_start"]): r for r in stored}
    loader = BatchLoader(out, "train", 7, shuffle=shuffle, seed=0)
    batches = list(loader)
    assert sum(b.batch_size for b in batches) == len(stored) == manifest.splits["train"].samples
    assert len(batches) == loader.num_batches(0)
    got = [r for b in batches for r in _batch_samples(b, schema)]
    if not shuffle:
        assert [(r["user_id"], r["window_start"]) for r in got] == list(by_key)
    for row in got:
        want = by_key[(row["user_id"], row["window_start"])]
        assert row.keys() == want.keys()
        for column, values in row.items():
            assert values == want[column], column  # exact: the same float32 values
    for batch in batches:
        _check_dtypes(batch)
        ref = build_token_layout(batch.history, batch.realtime, batch.scenarios, batch.batch_size)
        assert torch.equal(ref.group_ids, batch.layout.group_ids)
        assert int((batch.layout.token_type == TOKEN_T).sum()) == batch.num_exposures


def test_contiguous_batches_share_memory_with_arrow(prepared) -> None:
    out, _, manifest = prepared
    schema = manifest.schema_obj
    path = manifest.shard_paths(out, "train")[0]
    shard = LoadedShard(read_shard(path, schema), schema, str(path))
    batch = shard.batch(np.arange(1, 4))
    column = shard.samples.column("T.A.ts").chunk(0)
    first = int(column.offsets[1].as_py())
    values = column.values
    assert batch.scenarios["A"].timestamps.data_ptr() == values.buffers()[1].address + (values.offset + first) * 8
    assert batch.scenarios["A"].offsets[0] == 0
    ts = pq.read_table(sequence_path(path, "H.clicks")).column("ts")
    assert shard.sequences["H.clicks"].ts.tolist() == ts.to_pylist()  # loaded once per shard, gathered per batch


def test_corrupt_or_incomplete_shards_are_named(prepared, tmp_path) -> None:
    out, _, manifest = prepared
    schema = manifest.schema_obj
    path = manifest.shard_paths(out, "train")[0]
    table = pq.read_table(path)
    rows = pq.read_table(sequence_path(path, "H.orders")).num_rows
    end = table.column("H.orders.end").to_numpy().copy()
    end[2] = rows + 5
    bad = tmp_path / "part-00000.parquet"
    pq.write_table(table.set_column(table.column_names.index("H.orders.end"), "H.orders.end", pa.array(end)), bad)
    with pytest.raises(FileNotFoundError, match="part-00000.H.orders.parquet"):
        read_shard(bad, schema)
    for prefix, _ in sequence_types(schema):
        shutil.copy(sequence_path(path, prefix), sequence_path(bad, prefix))
    with pytest.raises(ValueError, match=r"part-00000.parquet: columns 'H.orders.start'/'H.orders.end', row 2: range"):
        LoadedShard(read_shard(bad, schema), schema, str(bad))


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
            assert list(s.sequences) == [p for p, _ in sequence_types(again.schema_obj)]
            for prefix, seq in s.sequences.items():
                assert seq.path == str(sequence_path(s.path, prefix))
                assert pq.read_table(out / seq.path).num_rows == seq.rows <= seq.items
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


def test_multi_categorical_sequence_features_are_gathered_per_row(tmp_path) -> None:
    """A list-valued feature in a sequence type stays a list column of the sequence file; the
    gather picks each row's list (inner offsets rebuilt per batch)."""
    schema_dict = tiny_schema_dict()
    schema_dict["realtime"][0]["features"].append(
        {"kind": "multi_categorical", "name": "tags", "num_embeddings": 6, "max_len": 2})
    raw = tiny_world(4, schema=schema_from_dict(schema_dict, "tiny+tags"))
    rng = np.random.default_rng(0)
    clicks = raw.tables["clicks"]
    tags = pl.Series("tags", [list(rng.integers(0, 6, rng.integers(0, 4))) for _ in range(len(clicks))],
                     dtype=pl.List(pl.Int64))
    raw.tables["clicks"] = clicks.with_columns(tags)
    manifest = prepare(raw, tmp_path, shards=2)
    stored = {(r["user_id"], r["window_start"]): r for r in _stored_samples(tmp_path, manifest, "train")}
    batches = list(BatchLoader(tmp_path, "train", 5, shuffle=True, seed=1))
    got = [r for b in batches for r in _batch_samples(b, manifest.schema_obj)]
    assert len(got) == len(stored) and any(r["R.recent.tags"] for r in got)
    for row in got:
        assert row == stored[(row["user_id"], row["window_start"])]
    values, offsets = batches[0].realtime["recent"].features.multi["tags"]
    assert values.dtype == offsets.dtype == torch.int64
    assert int(offsets[-1]) == values.numel() and offsets.numel() == batches[0].realtime["recent"].num_rows + 1


def test_a_store_of_another_format_version_is_refused_by_name(prepared, tmp_path) -> None:
    out, _, _ = prepared
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["format_version"] = 1  # one-row-per-sample lists: this loader cannot read it
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"format_version 1, this code reads \[3, 4\]"):
        read_manifest(tmp_path)
