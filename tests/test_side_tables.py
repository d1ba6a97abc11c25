"""Side tables joined by the schema (issue 11, item 4): the same store as a table joined by hand."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from data_world import tiny_schema_dict, tiny_world
from input_helpers import store_contents, write_world
from mtfm.config import SchemaError, schema_from_dict
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.raw import RawTables
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.validate import DataError
from test_store_loader import _flat


def _schema(sides: bool):
    """The tiny schema, plus a ``brand`` feature on click actions; with ``sides``, A's user and
    item features and the clicks' brand come from side tables."""
    d = tiny_schema_dict()
    d["history"][1]["features"].append({"kind": "categorical", "name": "brand", "num_embeddings": 5})
    if sides:
        d["scenarios"][0]["user_table"] = {"table": "users", "key": "user_id"}
        d["scenarios"][0]["item_table"] = {"table": "items", "key": "item"}
        d["history"][1]["item_table"] = {"table": "brands", "key": "item"}
    return schema_from_dict(d, "side.yaml")


def _worlds() -> tuple[RawTables, RawTables]:
    """(the world joined by hand, the same world as narrow tables plus side tables)."""
    raw = tiny_world(0)
    rng = np.random.default_rng(5)
    items = pl.DataFrame({"item": np.arange(1000, 1100), "color": rng.choice(["red", "green", "blue", "pink"], 100),
                          "tags": [list(rng.integers(0, 8, rng.integers(0, 5))) for _ in range(100)],
                          "price": rng.uniform(0, 50, 100)}).with_columns(pl.col("tags").cast(pl.List(pl.Int64)))
    users = pl.DataFrame({"user_id": np.arange(0, 12) * 7 + 3, "level": rng.integers(0, 4, 12)})
    brands = pl.DataFrame({"item": np.arange(0, 500), "brand": rng.integers(0, 5, 500)}).sample(fraction=1.0, seed=1)
    narrow_a = raw.tables["exp_a"].drop("color", "tags", "price", "level")
    wide_a = narrow_a.join(items, on="item", how="left", maintain_order="left").join(
        users, on="user_id", how="left", maintain_order="left")
    wide_clicks = raw.tables["clicks"].join(brands, on="item", how="left", maintain_order="left")
    wide = RawTables(_schema(False), {**raw.tables, "exp_a": wide_a, "clicks": wide_clicks}, raw.origins)
    narrow = RawTables(_schema(True), {**raw.tables, "exp_a": narrow_a, "items": items, "users": users,
                                       "brands": brands},
                       {**raw.origins, "items": "memory:items", "users": "memory:users", "brands": "memory:brands"})
    return wide, narrow


def _without_schema(contents):
    manifest, files = contents
    return {k: v for k, v in manifest.items() if k != "schema"}, files


def test_side_tables_give_the_store_of_the_table_joined_by_hand(tmp_path) -> None:
    wide, narrow = _worlds()
    prepare(wide, tmp_path / "wide")
    prepare(narrow, tmp_path / "narrow")
    assert _without_schema(store_contents(tmp_path / "narrow")) == _without_schema(store_contents(tmp_path / "wide"))


def test_a_request_joins_its_candidates_like_prepare(tmp_path) -> None:
    wide, narrow = _worlds()
    manifest = prepare(narrow, tmp_path / "p")
    exp = wide.tables["exp_a"]
    user, t = int(exp["user_id"][0]), int(exp["ts"][0])
    cand = exp.filter((pl.col("user_id") == user) & (pl.col("ts") // 100 == t // 100)).drop("click", "buy")
    full = build_request(wide, manifest, user, "A", cand, t)
    joined = build_request(narrow, manifest, user, "A", cand.drop("color", "tags", "price", "level"), t)
    assert _flat(joined) == _flat(full)


def _narrow_with(table: str, df: pl.DataFrame) -> RawTables:
    _, narrow = _worlds()
    return RawTables(narrow.schema, {**narrow.tables, table: df}, narrow.origins)


def test_an_unknown_key_names_the_row(tmp_path) -> None:
    _, narrow = _worlds()
    items = narrow.tables["items"].filter(pl.col("item") != int(narrow.tables["exp_a"]["item"][4]))
    with pytest.raises(DataError, match=r"memory:exp_a: column 'item', row 4: key \d+ is not in side table "
                                        r"memory:items \(\d+ row\(s\) in total have unknown keys\)"):
        prepare(_narrow_with("items", items), tmp_path)


def test_a_repeated_key_names_the_row(tmp_path) -> None:
    _, narrow = _worlds()
    users = pl.concat([narrow.tables["users"], narrow.tables["users"][[2]]])
    with pytest.raises(DataError, match=r"memory:users: column 'user_id', row 2: key 17 appears more than once"):
        prepare(_narrow_with("users", users), tmp_path)


def test_a_bad_side_value_is_named_by_the_side_table(tmp_path) -> None:
    _, narrow = _worlds()
    brands = narrow.tables["brands"]
    bad = brands.with_columns(pl.when(pl.int_range(pl.len()) == 9).then(7).otherwise(pl.col("brand")).alias("brand"))
    with pytest.raises(DataError, match=r"memory:brands: column 'brand', row 9: got 7; expected an id in \[0, 5\)"):
        prepare(_narrow_with("brands", bad), tmp_path)


def test_a_side_table_without_the_missing_columns_is_an_error(tmp_path) -> None:
    _, narrow = _worlds()
    with pytest.raises(DataError, match=r"memory:users: side table 'users' provides none of the feature columns "
                                        r"memory:exp_a lacks \(looked for \['level'"):
        prepare(_narrow_with("users", narrow.tables["users"].rename({"level": "lvl"})), tmp_path)


def test_schema_refuses_a_side_table_that_is_also_an_exposure_table() -> None:
    d = tiny_schema_dict()
    d["scenarios"][0]["item_table"] = {"table": "exp_b", "key": "item"}
    with pytest.raises(SchemaError, match=r"\['exp_b'\] are used both as side tables and as exposure/behaviour"):
        schema_from_dict(d, "s.yaml")


def test_the_directory_source_reads_side_tables(tmp_path) -> None:
    _, narrow = _worlds()
    write_world(narrow, tmp_path / "d")
    raw = load_directory(str(tmp_path / "d"), narrow.schema, None, 0)
    assert set(raw.tables) == {"exp_a", "exp_b", "orders", "clicks", "items", "users", "brands"}
    m = prepare(raw, tmp_path / "out")
    assert m.output_exposures == len(narrow.tables["exp_a"]) + len(narrow.tables["exp_b"])
    (tmp_path / "d" / "brands.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="table 'brands' not found"):
        load_directory(str(tmp_path / "d"), narrow.schema, None, 0)
