"""String ids (issue 11, item 2): text SKUs hashed and text vocabularies give the same ids at
prepare and in build_request (serving), whatever the text column's dtype."""

from __future__ import annotations

import polars as pl

from data_world import WINDOW, tiny_world
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.raw import RawTables


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
