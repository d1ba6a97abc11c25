"""String ids (issue 11, item 2): text SKUs hashed and text vocabularies give the same ids at
prepare and in build_request (serving), whatever the text column's dtype; ``vocabulary: train``
is built by prepare on the train split, with id 0 for values it has not seen."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest

from data_world import WINDOW, tiny_world
from mtfm.config import SchemaError, schema_from_dict
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.raw import RawTables
from mtfm.data.store import format_summary


def _text_world() -> RawTables:
    """The tiny world with scenario A's item ids as text SKUs (hash_buckets) and colours as text
    (vocabulary red/green/blue; "pink" is out of vocabulary)."""
    raw = tiny_world(6)
    a = raw.tables["exp_a"].with_columns(pl.format("SKU-{}", pl.col("item")).alias("item"))
    return RawTables(raw.schema, {**raw.tables, "exp_a": a}, raw.origins)


def test_text_ids_at_prepare_and_at_request_agree(tmp_path) -> None:
    raw = _text_world()
    manifest = prepare(raw, tmp_path)
    assert manifest.encoding["T.A.item.item"].encoding == "hash"
    assert manifest.encoding["T.A.item.color"].oov_values > 0  # pink, counted
    loader = BatchLoader(tmp_path, "test", 1, shuffle=False, seed=0, prefetch=0, scenarios=["A"])
    for batch in loader:
        user, start = int(batch.user_ids[0]), int(batch.window_start[0])
        exposures = raw.tables["exp_a"].filter((pl.col("user_id") == user) & (pl.col("ts") // WINDOW * WINDOW == start))
        if "pink" in exposures["color"].to_list():
            break
    cand = exposures.drop("click", "buy", "p_click")
    want = batch.scenarios["A"].item.categorical
    for form in (cand, cand.with_columns(pl.col("item", "color").cast(pl.Categorical))):
        got = build_request(raw, manifest, user, "A", form, request_time=start + WINDOW - 1).scenarios["A"].item
        assert {k: v.tolist() for k, v in got.categorical.items()} == {k: v.tolist() for k, v in want.items()}
    colors = exposures.sort("ts", maintain_order=True)["color"].to_list()  # the batch orders by time
    assert [c == "pink" for c in colors] == [i == 0 for i in want["color"].tolist()]  # OOV -> id 0
    assert all(0 <= i < 97 for i in want["item"].tolist())


# --------------------------------------------------------------------------------------------
# vocabulary: train (issue 11, item 2)
# --------------------------------------------------------------------------------------------


def _train_vocab_world(**vocab: object) -> RawTables:
    """The text world with scenario A's ``item`` SKUs under ``vocabulary: train`` (``vocab`` adds
    min_count / max_size / share) and one SKU that appears only in the test split."""
    raw = _text_world()
    d = raw.schema.model_dump(mode="json")
    item = next(f for f in d["scenarios"][0]["item_features"] if f["name"] == "item")
    item.pop("hash_buckets")
    item.update(vocabulary="train", **vocab)
    a = raw.tables["exp_a"]
    last = a["ts"].max()
    a = a.with_columns(pl.when(pl.col("ts") == last).then(pl.lit("SKU-only-in-test")).otherwise(pl.col("item"))
                       .alias("item"))
    return RawTables(schema_from_dict(d), {**raw.tables, "exp_a": a}, raw.origins)


def _expected_vocab(raw: RawTables, valid_start: int, min_count: int = 1, max_size: int | None = None) -> list[str]:
    """Plain Python: train rows' values, most frequent first, ties by value."""
    a = raw.tables["exp_a"]
    train = [v for v, t in zip(a["item"].to_list(), a["ts"].to_list()) if t // WINDOW * WINDOW < valid_start]
    counts = Counter(train)
    ranked = sorted((v for v in counts if counts[v] >= min_count), key=lambda v: (-counts[v], v))
    return ranked[:max_size] if max_size is not None else ranked


def test_train_vocabulary_from_string_skus_end_to_end(tmp_path) -> None:
    raw = _train_vocab_world()
    manifest = prepare(raw, tmp_path)
    feature = manifest.schema_obj.scenario("A").item_features[0]
    assert feature.name == "item"
    want = _expected_vocab(raw, manifest.split_boundaries.valid_start)
    assert feature.vocabulary == want and len(set(want)) == len(want) > 5  # the built list, in the stored schema
    assert manifest.encoding["T.A.item.item"].encoding == "vocabulary"
    assert manifest.encoding["T.A.item.item"].cardinality == len(want) + 1
    info = manifest.vocabularies["scenarios[A].item_features[item]"]
    assert info.size == len(want) == info.train_distinct and info.min_count == 1
    assert info.splits["train"].oov == 0 and info.splits["train"].values == manifest.splits["train"].scenario_exposures["A"]
    assert info.splits["test"].oov > 0  # at least the test-only SKU
    assert sum(s.values for s in info.splits.values()) == manifest.scenarios["A"].exposures
    assert manifest.encoding["T.A.item.item"].oov_values == info.splits["valid"].oov + info.splits["test"].oov
    text = format_summary(manifest)
    assert (f"vocabulary 'scenarios[A].item_features[item]' (from train): {len(want)} values of {len(want)} distinct; "
            f"out of vocabulary: train 0.0% of {info.splits['train'].values}") in text
    # ids in the shards: id = position in the built list + 1, unseen values 0
    position = {v: i + 1 for i, v in enumerate(want)}
    for split in ("train", "test"):
        loader = BatchLoader(tmp_path, split, 64, shuffle=False, seed=0, prefetch=0, scenarios=["A"])
        for batch in loader:
            ids = batch.scenarios["A"].item.categorical["item"].tolist()
            assert all(0 <= i <= len(want) for i in ids)
            if split == "train":
                assert 0 not in ids


def test_a_value_only_in_test_is_oov_at_prepare_and_at_serving_and_others_agree(tmp_path) -> None:
    raw = _train_vocab_world()
    manifest = prepare(raw, tmp_path)
    vocab = manifest.schema_obj.scenario("A").item_features[0].vocabulary
    assert "SKU-only-in-test" not in vocab
    a = raw.tables["exp_a"]
    row = a.filter(pl.col("item") == "SKU-only-in-test").row(0, named=True)
    user, start = row["user_id"], row["ts"] // WINDOW * WINDOW
    loader = BatchLoader(tmp_path, "test", 1, shuffle=False, seed=0, prefetch=0, scenarios=["A"])
    batch = next(b for b in loader if int(b.user_ids[0]) == user and int(b.window_start[0]) == start)
    stored = batch.scenarios["A"].item.categorical["item"].tolist()
    exposures = a.filter((pl.col("user_id") == user) & (pl.col("ts") // WINDOW * WINDOW == start)).sort("ts", maintain_order=True)
    items = exposures["item"].to_list()
    assert [s == 0 for s in stored] == [v not in vocab for v in items]  # the test-only SKU -> 0 (OOV)
    assert [s for s, v in zip(stored, items) if v in vocab] == [vocab.index(v) + 1 for v in items if v in vocab]
    cand = exposures.drop("click", "buy", "p_click")
    for form in (cand, cand.with_columns(pl.col("item").cast(pl.Categorical))):
        got = build_request(raw, manifest, user, "A", form, request_time=start + WINDOW - 1)
        assert got.scenarios["A"].item.categorical["item"].tolist() == stored


def test_min_count_and_max_size_prune_the_train_vocabulary(tmp_path) -> None:
    raw = _train_vocab_world(vocabulary_min_count=2, vocabulary_max_size=4)
    manifest = prepare(raw, tmp_path)
    want = _expected_vocab(raw, manifest.split_boundaries.valid_start, min_count=2, max_size=4)
    assert manifest.schema_obj.scenario("A").item_features[0].vocabulary == want and len(want) == 4
    info = manifest.vocabularies["scenarios[A].item_features[item]"]
    assert (info.size, info.min_count, info.max_size) == (4, 2, 4) and info.splits["train"].oov > 0
    assert "(min_count 2, max_size 4)" in format_summary(manifest)


def test_a_shared_train_vocabulary_counts_every_member_once(tmp_path) -> None:
    """Scenario A's items and the click sequences (two types over one table) declare one share:
    one vocabulary over A's train exposures and the clicks table's train rows (counted once)."""
    raw = _train_vocab_world(share="items")
    d = raw.schema.model_dump(mode="json")
    for seq in d["history"] + d["realtime"]:
        if seq["table"] == "clicks":
            seq["features"][0] = {"kind": "categorical", "name": "item", "vocabulary": "train", "share": "items"}
    clicks = raw.tables["clicks"].with_columns(pl.format("SKU-{}", pl.col("item")).alias("item"))
    raw = RawTables(schema_from_dict(d), {**raw.tables, "clicks": clicks}, raw.origins)
    manifest = prepare(raw, tmp_path)
    valid_start = manifest.split_boundaries.valid_start
    counts = Counter(v for v, t in zip(raw.tables["exp_a"]["item"], raw.tables["exp_a"]["ts"])
                     if t // WINDOW * WINDOW < valid_start)
    counts.update(v for v, t in zip(clicks["item"], clicks["ts"]) if t // WINDOW * WINDOW < valid_start)
    want = sorted(counts, key=lambda v: (-counts[v], v))
    schema = manifest.schema_obj
    lists = {p: f.vocabulary for p, _, f in schema.id_features() if f.share == "items"}
    assert set(lists) == {"history[clicks].features[item]", "realtime[recent].features[item]",
                          "scenarios[A].item_features[item]"}
    assert all(v == want for v in lists.values())
    info = manifest.vocabularies["items"]
    assert info.features == ["history[clicks].features[item]", "scenarios[A].item_features[item]"]
    assert info.splits["train"].values == sum(counts.values())
    assert "share 'items'" in format_summary(manifest)


def test_train_vocabulary_schema_rules() -> None:
    d = _train_vocab_world().schema.model_dump(mode="json")
    item = next(f for f in d["scenarios"][0]["item_features"] if f["name"] == "item")
    item.update(vocabulary=["a", "b"], vocabulary_min_count=2)
    with pytest.raises(SchemaError, match="vocabulary_min_count only apply to 'vocabulary: train'"):
        schema_from_dict(d)
    unresolved = _train_vocab_world().schema.scenario("A").item_features[0]
    with pytest.raises(SchemaError, match="'vocabulary: train' is built by mtfm prepare"):
        unresolved.cardinality


def test_cli_prepare_and_train_print_vocabularies_and_the_sharing_plan(tmp_path, capsys) -> None:
    """``mtfm prepare`` (raw files with text SKUs) reports the train vocabulary and the sharing
    plan; ``mtfm train`` prints the plan of the model it builds before training."""
    from mtfm.cli import main
    from mtfm.config import dump_schema
    from train_fixtures import write_tiny_model_yaml

    raw = _train_vocab_world(share="items")
    d = tmp_path / "raw"
    d.mkdir()
    for name, df in raw.tables.items():
        df.write_parquet(d / f"{name}.parquet")
    dump_schema(raw.schema, d / "schema.yaml")
    assert main(["prepare", "--source", "directory", "--path", str(d), "--schema", str(d / "schema.yaml"),
                 "--out", str(tmp_path / "data"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 'items' (from train):" in out and "out of vocabulary: train 0.0%" in out
    assert "embedding tables: 8 (1 shared by `share:`, read by 1 feature; 7 unshared features" in out
    assert "  share 'items' (" in out and "A item.item" in out
    model = write_tiny_model_yaml(tmp_path / "tiny.yaml")
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", model,
                 "--quiet", "--batch-size", "8", "--epochs", "1", "--scenarios", "A"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("embedding tables: 7 (1 shared by `share:`")
    assert "B item.item" not in out.split("\n\n")[0]
