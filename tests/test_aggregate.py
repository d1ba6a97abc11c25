"""Aggregation invariants, against a plain-Python reference (tests/data_world.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from data_world import WINDOW, WorldSize, reference_samples, tiny_world
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtfm.data.aggregate import (
    _duplicate_mask,
    aggregate,
    build_request,
    prepare,
    shard_bounds,
    split_boundaries,
    union_rows,
)
from mtfm.data.batch import JaggedBatch
from mtfm.data.encode import HASH_SEEDS
from mtfm.data.loader import LoadedShard, batch_of
from mtfm.data.raw import RawTables
from mtfm.data.store import (
    read_manifest,
    sequence_columns,
    sequence_path,
    sequence_types,
)
from mtfm.data.validate import validate_raw


def _rows_per_sample(batch: JaggedBatch, raw: RawTables) -> dict[tuple[int, int], dict]:
    """Samples of a batch as {(user, window_start): {"T"/"H"/"R": {name: [(rid, ts), ...]}}}."""
    s = raw.schema
    out = {}
    for b, (user, start) in enumerate(zip(batch.user_ids.tolist(), batch.window_start.tolist())):
        sample: dict[str, dict] = {"T": {}, "H": {}, "R": {}}
        for sc in s.scenarios:
            part = batch.scenarios[sc.name]
            lo, hi = int(part.offsets[b]), int(part.offsets[b + 1])
            group = next(g for g in ("item", "user", "cross") if "rid" in getattr(part, g).numeric)
            rid = getattr(part, group).numeric["rid"][lo:hi].tolist()
            sample["T"][sc.name] = list(zip(rid, part.timestamps[lo:hi].tolist()))
        for kind, field, specs in (("H", "history", s.history), ("R", "realtime", s.realtime)):
            for spec in specs:
                seq = getattr(batch, field)[spec.name]
                lo, hi = int(seq.offsets[b]), int(seq.offsets[b + 1])
                rid = seq.features.numeric["rid"][lo:hi].tolist()
                sample[kind][spec.name] = list(zip(rid, seq.timestamps[lo:hi].tolist()))
        out[(user, start)] = sample
    return out


def _reference_rows(raw: RawTables) -> dict[tuple[int, int], dict]:
    ref = reference_samples(raw)
    return {
        key: {kind: {name: [(float(r["rid"]), r["ts"]) for r in rows] for name, rows in sample[kind].items()}
              for kind in ("T", "H", "R")}
        for key, sample in ref.items()
    }


def _aggregate_all(raw: RawTables, order_seed: int | None = None) -> JaggedBatch:
    """Every sample through the store's layout (Aggregation.shard) and the loader's gather, in
    (user, window) order or, with ``order_seed``, a random order and two shards."""
    validate_raw(raw)
    agg = aggregate(raw.tables, raw.origins, raw.schema)
    everything = np.arange(agg.num_samples)
    if order_seed is None:
        return LoadedShard(agg.shard(everything), raw.schema, "memory").batch(everything)
    cut = agg.num_samples // 2
    shards = [LoadedShard(agg.shard(part), raw.schema, "memory") for part in (everything[:cut], everything[cut:])]
    rng = np.random.default_rng(order_seed)
    return batch_of([(shards[1], rng.permutation(agg.num_samples - cut)), (shards[0], rng.permutation(cut))],
                    raw.schema)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(1, 15), windows=st.integers(1, 8))
def test_aggregation_equals_the_plain_python_reference(seed: int, users: int, windows: int) -> None:
    size = WorldSize(users=users, windows=windows, exposures_a=40, exposures_b=25, orders=30, clicks=40)
    raw = tiny_world(seed, size)
    raw.tables = {t: df.unique(subset=["user_id", "ts", "rid"], keep="first", maintain_order=True)
                  for t, df in raw.tables.items()}
    want = _reference_rows(raw)
    assert _rows_per_sample(_aggregate_all(raw), raw) == want
    assert _rows_per_sample(_aggregate_all(raw, order_seed=seed), raw) == want  # any order, two shards


def test_sequence_files_store_each_needed_action_once_and_samples_point_into_them() -> None:
    raw = tiny_world(3, WorldSize(users=5, windows=8, exposures_a=200, exposures_b=100, orders=80, clicks=300))
    validate_raw(raw)
    agg = aggregate(raw.tables, raw.origins, raw.schema)
    everything = np.arange(agg.num_samples)
    shard = agg.shard(everything)
    samples = shard.samples.to_pydict()
    for prefix, spec in sequence_types(raw.schema):
        flat = shard.sequences[prefix].to_pydict()
        assert list(flat) == sequence_columns(spec)
        needed = set()
        for i in range(agg.num_samples):
            lo, hi = samples[f"{prefix}.start"][i], samples[f"{prefix}.end"][i]
            needed.update(flat["rid"][lo:hi])
        assert sorted(needed) == sorted(flat["rid"]) and len(set(flat["rid"])) == len(flat["rid"])  # each once
        items = sum(e - s for s, e in zip(samples[f"{prefix}.start"], samples[f"{prefix}.end"]))
        assert len(flat["rid"]) < items  # consecutive windows share actions
    # Union of ranges in any sample order is the same set of rows.
    start, end = agg.sequences[0].start, agg.sequences[0].end
    perm = np.random.default_rng(0).permutation(start.size)
    assert union_rows(start[perm], end[perm]).tolist() == union_rows(start, end).tolist()
    pos = np.concatenate([np.arange(a, b) for a, b in zip(start, end)] + [np.zeros(0, dtype=np.int64)])
    assert union_rows(start, end).tolist() == np.unique(pos).tolist()


def test_every_exposure_exactly_once_and_sequences_respect_the_window() -> None:
    raw = tiny_world(3)
    samples = _rows_per_sample(_aggregate_all(raw), raw)
    for spec in raw.schema.scenarios:
        seen = sorted(rid for s in samples.values() for rid, _ in s["T"][spec.name])
        assert seen == list(map(float, range(len(raw.tables[spec.table]))))
    for (_, start), s in samples.items():
        for rows in s["T"].values():
            stamps = [t for _, t in rows]
            assert stamps == sorted(stamps) and all(start <= t < start + WINDOW for t in stamps)
        for rows in s["H"].values():
            assert all(t < start for _, t in rows)  # nothing at or after the window start
        for spec in raw.schema.realtime:
            rows = s["R"][spec.name]
            raw_ts = raw.tables[spec.table]["ts"].to_list()
            assert all(t < start + WINDOW for _, t in rows)
            assert [t for _, t in rows] == [raw_ts[int(rid)] for rid, _ in rows]  # R keeps its timestamps
            before = [t for _, t in rows if t < start]
            assert len(before) <= spec.max_len  # max_len before the window, then the window's own actions


def test_sample_and_time_ranges_that_overflow_a_packed_key_use_the_fallback_paths() -> None:
    raw = tiny_world(5)
    expected = _rows_per_sample(_aggregate_all(raw), raw)
    # 64-bit user ids far apart and millisecond-like huge timestamps: same samples, shifted.
    big_user, shift = 1 << 61, 10**15 * WINDOW
    moved = {t: df.with_columns(pl.col("user_id") * 3 + big_user, pl.col("ts") + shift) for t, df in raw.tables.items()}
    raw2 = RawTables(raw.schema, moved, raw.origins)
    got = _rows_per_sample(_aggregate_all(raw2), raw2)
    back = {((u - big_user) // 3, w - shift): {k: {n: [(r, t - shift) for r, t in rows] for n, rows in v.items()}
                                               for k, v in s.items()}
            for (u, w), s in got.items()}
    assert back == expected


def test_fraction_split_counts_distinct_windows_and_absolute_split_is_taken_as_given() -> None:
    raw = tiny_world(0)
    windows = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    b = split_boundaries(raw.schema, windows)  # 8 windows, 25 % / 25 %: 2 valid, 2 test
    assert (b.style, b.valid_start, b.test_start) == ("fraction", 14 * WINDOW, 16 * WINDOW)
    schema = raw.schema.model_copy(update={"split": raw.schema.split.model_copy(
        update={"valid_fraction": None, "test_fraction": None, "valid_start": 5, "test_start": 7})})
    b = split_boundaries(schema, windows)
    assert (b.style, b.valid_start, b.test_start) == ("absolute", 5, 7)


def test_normalisation_statistics_come_from_the_train_split_only(tmp_path) -> None:
    raw = tiny_world(1)
    m1 = prepare(raw, tmp_path / "a")
    valid_start = m1.split_boundaries.valid_start
    changed = raw.tables["exp_a"].with_columns(
        pl.when(pl.col("ts") // WINDOW * WINDOW >= valid_start).then(1e6).otherwise(pl.col("ctr_hist"))
        .alias("ctr_hist"))
    m2 = prepare(RawTables(raw.schema, {**raw.tables, "exp_a": changed}, raw.origins), tmp_path / "b")
    s1, s2 = m1.encoding["T.A.cross.ctr_hist"], m2.encoding["T.A.cross.ctr_hist"]
    assert (s1.mean, s1.std, s1.fit_rows) == (s2.mean, s2.std, s2.fit_rows)
    assert s1.fit_rows == m1.splits["train"].scenario_exposures["A"]


def test_vocabulary_oov_and_truncated_lists_are_counted(tmp_path) -> None:
    raw = tiny_world(2)
    m = prepare(raw, tmp_path)
    colors = raw.tables["exp_a"]["color"]
    assert m.encoding["T.A.item.color"].oov_values == int((colors == "pink").sum())
    lengths = raw.tables["exp_a"]["tags"].list.len().to_list()
    assert m.encoding["T.A.item.tags"].truncated_values == sum(max(n - 3, 0) for n in lengths) > 0


def test_hashed_ids_are_stable_across_processes() -> None:
    code = (
        "import polars as pl\n"
        "from mtfm.config import CategoricalFeature\n"
        "from mtfm.data.encode import encode_ids\n"
        "f = CategoricalFeature(name='x', hash_buckets=1000)\n"
        "print(encode_ids(pl.Series([1, 2, 3, 123456789]), f)[0].to_list(),"
        " encode_ids(pl.Series(['a', 'bb']), f)[0].to_list())\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
    from mtfm.config import CategoricalFeature
    from mtfm.data.encode import encode_ids

    f = CategoricalFeature(name="x", hash_buckets=1000)
    ints, text = encode_ids(pl.Series([1, 2, 3, 123456789]), f)[0], encode_ids(pl.Series(["a", "bb"]), f)[0]
    here = f"{ints.to_list()} {text.to_list()}"
    assert runs[0].strip() == here
    # Integer width does not change the id (hashed as Int64).
    assert encode_ids(pl.Series([7], dtype=pl.Int32), f)[0].to_list() == encode_ids(pl.Series([7]), f)[0].to_list()
    assert len(HASH_SEEDS) == 4


def test_oracle_table_covers_the_requested_splits(tmp_path) -> None:
    raw = tiny_world(4)
    assert set(prepare(raw, tmp_path / "a").oracle) == {"valid", "test"}
    assert set(prepare(raw, tmp_path / "b", oracle_splits=("train",)).oracle) == {"train"}
    with pytest.raises(ValueError, match="unknown oracle split"):
        prepare(raw, tmp_path / "c", oracle_splits=("dev",))


def test_prepare_is_deterministic(tmp_path) -> None:
    raw = tiny_world(4)
    m1 = prepare(raw, tmp_path / "a", shards=2)
    m2 = prepare(tiny_world(4), tmp_path / "b", shards=2)
    d1, d2 = m1.model_dump(exclude={"timings_s", "cpu_s"}), m2.model_dump(exclude={"timings_s", "cpu_s"})
    assert d1 == d2
    import pyarrow.parquet as pq

    for info in m1.splits.values():
        for shard in info.shards:
            files = [shard.path] + [str(sequence_path(shard.path, p)) for p, _ in sequence_types(raw.schema)]
            assert [s.path for s in shard.sequences.values()] == files[1:]
            for rel in files:
                assert pq.read_table(tmp_path / "a" / rel).equals(pq.read_table(tmp_path / "b" / rel))


def test_request_for_real_exposures_reproduces_the_training_sample(tmp_path) -> None:
    from mtfm.data.loader import BatchLoader

    raw = tiny_world(6)
    manifest = prepare(raw, tmp_path)
    loader = BatchLoader(tmp_path, "test", 1, shuffle=False, seed=0, prefetch=0, scenarios=["A"])
    batch = next(iter(loader))
    user, start = int(batch.user_ids[0]), int(batch.window_start[0])
    exposures = raw.tables["exp_a"].filter((pl.col("user_id") == user) & (pl.col("ts") // WINDOW * WINDOW == start))
    request = build_request(raw, read_manifest(tmp_path), user, "A", exposures.drop("click", "buy", "p_click"),
                            request_time=start + WINDOW - 1)
    for kind in ("history", "realtime"):
        for name, seq in getattr(batch, kind).items():
            other = getattr(request, kind)[name]
            assert seq.timestamps.tolist() == other.timestamps.tolist()
            for f, t in seq.features.categorical.items():
                assert t.tolist() == other.features.categorical[f].tolist(), (kind, name, f)
            for f, t in seq.features.numeric.items():
                assert t.tolist() == other.features.numeric[f].tolist(), (kind, name, f)
    want, got = batch.scenarios["A"], request.scenarios["A"]
    assert want.timestamps.tolist() == got.timestamps.tolist()
    for group in ("user", "cross", "item"):
        a, b = getattr(want, group), getattr(got, group)
        assert {k: v.tolist() for k, v in a.categorical.items()} == {k: v.tolist() for k, v in b.categorical.items()}
        assert {k: v.tolist() for k, v in a.numeric.items()} == {k: v.tolist() for k, v in b.numeric.items()}
        assert {k: [x.tolist() for x in v] for k, v in a.multi.items()} == {
            k: [x.tolist() for x in v] for k, v in b.multi.items()}
    assert not got.label_mask.any()  # no labels were given
    assert request.layout.token_type.tolist() == batch.layout.token_type.tolist()
    assert manifest.samples >= 1


def test_request_without_timestamps_keeps_candidate_order_and_rejects_other_windows(tmp_path) -> None:
    raw = tiny_world(6)
    prepare(raw, tmp_path)
    manifest = read_manifest(tmp_path)
    cands = raw.tables["exp_a"].head(5).drop("user_id", "ts", "click", "buy", "p_click")
    batch = build_request(raw, manifest, 3, "A", cands, request_time=1234)
    assert batch.scenarios["A"].item.numeric["rid"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert batch.scenarios["A"].timestamps.tolist() == [1234] * 5
    with pytest.raises(ValueError, match="outside the request's window"):
        build_request(raw, manifest, 3, "A", cands.with_columns(pl.lit(5000).alias("ts")), request_time=1234)
    with pytest.raises(KeyError, match="unknown scenario"):
        build_request(raw, manifest, 3, "Z", cands, request_time=1234)


@settings(max_examples=50, deadline=None)
@given(weights=st.lists(st.integers(0, 50), min_size=0, max_size=40), min_shards=st.integers(1, 8),
       max_rows=st.integers(1, 200))
def test_shard_bounds_cover_every_sample_once_in_non_empty_shards(weights, min_shards, max_rows) -> None:
    w = np.array(weights, dtype=np.int64)
    cuts = shard_bounds(w, min_shards, max_rows)
    assert cuts[0] == 0 and cuts[-1] == w.size
    if w.size:
        assert np.all(np.diff(cuts) > 0)
        assert cuts.size - 1 == min(w.size, max(min_shards, -(-int(w.sum()) // max_rows)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), users=st.integers(1, 4), stamps=st.integers(1, 6))
@example(seed=1, n=300, users=1, stamps=2)  # runs of ~150 rows: the hashed path
@example(seed=1, n=60, users=4, stamps=6)  # runs of a few rows: the lag path
def test_duplicate_detection_keeps_exactly_the_first_distinct_rows(seed: int, n: int, users: int, stamps: int) -> None:
    """Short (user, ts) runs use pairwise lags, runs over 32 rows use row hashes: both must
    keep exactly polars' first-distinct rows (every column compared, nulls and NaNs equal)."""
    rng = np.random.default_rng(seed)
    df = pl.DataFrame({
        "user_id": rng.integers(0, users, n), "ts": rng.integers(0, stamps, n),
        "a": rng.integers(0, 2, n), "b": rng.choice([0.5, float("nan")], n),
        "c": pl.Series(rng.choice(["x", "y"], n)).replace("y", None),
        "d": [[int(v)] * int(v) for v in rng.integers(0, 2, n)],
    })
    order = np.lexsort((df["ts"].to_numpy(), df["user_id"].to_numpy()))  # stable (user, ts) order
    u, t = df["user_id"].to_numpy()[order], df["ts"].to_numpy()[order]
    same = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    dup = _duplicate_mask(df, order.astype(np.int64), same, ["user_id", "ts"])
    kept = np.sort(order[~dup])
    expected = np.flatnonzero(df.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy())
    assert kept.tolist() == expected.tolist()
