"""Vector features and "the entry at the shown item's index" (issue 11, item 3)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from data_world import tiny_schema_dict, tiny_world
from input_helpers import store_contents, write_csv, write_world
from mtfm.config import SchemaError, schema_from_dict
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.raw import RawTables
from mtfm.data.sources.directory import load_source as load_directory
from mtfm.data.validate import DataError
from test_store_loader import _flat

DIM = 3


def _schema(declared: bool):
    """Scenario B with a 3-vector ``emb`` (item) and ``aff_at_item`` (cross): declared as a
    vector and a vector entry, or as the numeric features they stand for."""
    d = tiny_schema_dict()
    b = d["scenarios"][1]
    if declared:
        b["item_features"].append({"kind": "vector", "name": "emb", "dim": DIM, "normalization": "standard"})
        b["cross_features"] = [{"kind": "vector_entry", "name": "aff_at_item", "vector": "affinity", "index": "item",
                                "normalization": "minmax"}]
    else:
        b["item_features"] += [{"kind": "numeric", "name": f"emb[{i}]", "normalization": "standard"}
                               for i in range(DIM)]
        b["cross_features"] = [{"kind": "numeric", "name": "aff_at_item", "normalization": "minmax"}]
    return schema_from_dict(d, "vec.yaml")


def _worlds() -> tuple[RawTables, RawTables]:
    """(scalar columns written out by hand, the same data as list columns)."""
    raw = tiny_world(0)
    b = raw.tables["exp_b"]
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(len(b), DIM))
    affinity = rng.uniform(size=(len(b), 50))  # one value per item of B (ids 0..49)
    at_item = affinity[np.arange(len(b)), b["item"].to_numpy()]
    lists = b.with_columns(pl.Series("emb", emb.tolist()), pl.Series("affinity", affinity.tolist()))
    scalars = b.with_columns(*[pl.Series(f"emb[{i}]", emb[:, i]) for i in range(DIM)], pl.Series("aff_at_item", at_item))
    return (RawTables(_schema(False), {**raw.tables, "exp_b": scalars}, raw.origins),
            RawTables(_schema(True), {**raw.tables, "exp_b": lists}, raw.origins))


def _data(contents):
    manifest, files = contents
    return {k: v for k, v in manifest.items() if k != "schema"}, files


def test_a_vector_and_a_vector_entry_store_what_their_scalar_columns_store(tmp_path) -> None:
    scalars, lists = _worlds()
    prepare(scalars, tmp_path / "scalars")
    m = prepare(lists, tmp_path / "lists")
    assert _data(store_contents(tmp_path / "lists")) == _data(store_contents(tmp_path / "scalars"))
    assert [k for k in m.encoding if "emb" in k] == [f"T.B.item.emb[{i}]" for i in range(DIM)]
    as_array = lists.tables["exp_b"].with_columns(pl.col("emb").list.to_array(DIM))
    prepare(RawTables(lists.schema, {**lists.tables, "exp_b": as_array}, lists.origins), tmp_path / "array")
    assert _data(store_contents(tmp_path / "array")) == _data(store_contents(tmp_path / "scalars"))


def test_vectors_from_csv_text(tmp_path) -> None:
    scalars, lists = _worlds()
    write_world(lists, tmp_path / "d")
    (tmp_path / "d" / "exp_b.parquet").unlink()
    b = lists.tables["exp_b"].with_columns(pl.col("emb", "affinity").cast(pl.List(pl.String)).list.join("|"))
    write_csv(b, tmp_path / "d" / "exp_b.csv")
    raw = load_directory(str(tmp_path / "d"), lists.schema, None, 0)
    m = prepare(raw, tmp_path / "out")
    assert m.output_exposures == len(b) + len(lists.tables["exp_a"])


def test_a_request_expands_vectors_like_prepare(tmp_path) -> None:
    scalars, lists = _worlds()
    manifest = prepare(lists, tmp_path / "p")
    manifest_scalars = prepare(scalars, tmp_path / "s")
    b = lists.tables["exp_b"]
    user, t = int(b["user_id"][0]), int(b["ts"][0])
    pick = (pl.col("user_id") == user) & (pl.col("ts") // 100 == t // 100)
    from_lists = build_request(lists, manifest, user, "B", b.filter(pick).drop("click"), t)
    from_scalars = build_request(scalars, manifest_scalars, user, "B",
                                 scalars.tables["exp_b"].filter(pick).drop("click"), t)
    assert _flat(from_lists) == _flat(from_scalars)


def _bad(table_change) -> RawTables:
    _, lists = _worlds()
    return RawTables(lists.schema, {**lists.tables, "exp_b": table_change(lists.tables["exp_b"])}, lists.origins)


def _set_row(df: pl.DataFrame, column: str, row: int, value) -> pl.DataFrame:
    values = df[column].to_list()
    values[row] = value
    return df.with_columns(pl.Series(column, values, dtype=df[column].dtype))


@pytest.mark.parametrize("change, message", [
    (lambda df: _set_row(df, "emb", 5, [1.0, 2.0]),
     r"column 'emb', row 5: got \[1.0, 2.0\]; expected a list of exactly 3 numbers \(dim\) \(1 bad row"),
    (lambda df: _set_row(df, "emb", 2, None), r"column 'emb', row 2: got None; expected a list of numbers"),
    (lambda df: _set_row(df, "affinity", 7, [0.5] * 10),
     r"column 'item', row 7: got \d+; expected a position in \[0, length of 'affinity'\)"),
    (lambda df: df.with_columns(pl.col("emb").cast(pl.List(pl.String)).list.join("|"))
     .pipe(_set_row, "emb", 4, "0.1|x|0.3"),
     r"column 'emb', row 4: got '0.1\|x\|0.3'; expected a list of numbers \(an element is not a number\)"),
    (lambda df: _set_row(df, "emb", 8, [0.0, float("nan"), 1.0]),
     r"column 'emb\[1\]', row 8: got nan"),
])
def test_bad_vectors_name_column_row_and_value(change, message, tmp_path) -> None:
    bad = _bad(change)
    if "position" in message:  # make sure row 7's item is beyond the shortened vector
        bad.tables["exp_b"] = _set_row(bad.tables["exp_b"], "item", 7, 30)
    with pytest.raises(DataError, match=message):
        prepare(bad, tmp_path)


def test_schema_rules_for_vectors() -> None:
    d = tiny_schema_dict()
    d["scenarios"][1]["item_features"].append({"kind": "vector", "name": "score", "dim": 2})
    with pytest.raises(SchemaError, match="duplicate feature names"):
        schema_from_dict(d, "s.yaml")
    d = tiny_schema_dict()
    d["history"][0]["features"].append({"kind": "vector", "name": "v", "dim": 2})
    with pytest.raises(SchemaError, match=r"history\[orders\].features"):
        schema_from_dict(d, "s.yaml")
    d = tiny_schema_dict()
    d["scenarios"][1]["item_features"].append({"kind": "vector", "name": "v", "dim": 0})
    with pytest.raises(SchemaError, match="dim"):
        schema_from_dict(d, "s.yaml")


def test_the_model_trains_on_a_prepared_vector_feature(tmp_path) -> None:
    import torch

    from mtfm.data.loader import BatchLoader
    from mtfm.model import MTFM
    from mtfm.model.testing import tiny_config

    _, lists = _worlds()
    prepare(lists, tmp_path / "p")
    loader = BatchLoader(tmp_path / "p", "train", 8, shuffle=False, seed=0, prefetch=0)
    batch = next(iter(loader))
    assert set(batch.scenarios["B"].item.numeric) >= {f"emb[{i}]" for i in range(DIM)}
    model = MTFM(loader.schema, tiny_config())
    loss = model.loss(batch, model(batch))
    assert torch.isfinite(loss)
    loss.backward()
