"""Feature embeddings: shared tables, pooled lists, numeric encoders, subsets."""

from __future__ import annotations

import torch

from mtfm.config import schema_from_dict
from mtfm.data.batch import FeatureTensors
from mtfm.model import MTFM
from mtfm.model.testing import tiny_config, tiny_schema


def test_declared_share_names_give_one_table_and_undeclared_features_their_own():
    schema = tiny_schema()  # item_id and tags declare share; shop, age, dish_type, vip, brand do not
    emb = MTFM(schema, tiny_config()).embeddings
    keys = {emb.table_of[(f, "item_id")] for f in ("H:orders", "H:clicks", "R:recent", "T:feed:item", "T:food:item")}
    assert keys == {"item_id"}
    assert emb.table_of[("R:recent", "tags")] == emb.table_of[("T:feed:item", "tags")] == "tags"
    assert emb.table_of[("T:coupon:item", "brand")] == "T_coupon_item__brand"
    assert len(emb.tables) == 2 + 5
    raw = schema.model_dump(mode="json")
    for seq in raw["history"] + raw["realtime"]:
        for f in seq["features"]:
            f.pop("share", None)
    unshared = MTFM(schema_from_dict(raw), tiny_config()).embeddings
    keys = {unshared.table_of[(f, "item_id")] for f in ("H:orders", "H:clicks", "R:recent", "T:feed:item", "T:food:item")}
    assert len(keys) == 4  # the scenarios' item_id still declare 'item_id'; each sequence's is its own


def test_multi_valued_features_are_mean_pooled_and_empty_lists_give_zeros():
    emb = MTFM(tiny_schema(), tiny_config()).embeddings
    table = emb.tables[emb.table_of[("R:recent", "tags")]].weight
    values, offsets = torch.tensor([1, 2, 3, 6]), torch.tensor([0, 3, 3, 4])
    ft = FeatureTensors(categorical={"item_id": torch.tensor([0, 1, 2])}, multi={"tags": (values, offsets)})
    out = emb.embed("R:recent", ft, 3)
    dim = table.shape[1]
    pooled = out[:, -dim:]
    torch.testing.assert_close(pooled[0], table[[1, 2, 3]].mean(0))
    torch.testing.assert_close(pooled[1], torch.zeros(dim))
    torch.testing.assert_close(pooled[2], table[6])


def test_embedding_subset_shares_tables_and_keeps_only_needed_ones():
    emb = MTFM(tiny_schema(), tiny_config()).embeddings
    sub = emb.subset(["H:orders", "T:coupon:item"])
    assert set(sub.tables) == {emb.table_of[("H:orders", "item_id")], emb.table_of[("H:orders", "shop")],
                               emb.table_of[("T:coupon:item", "brand")]}
    for key in sub.tables:
        assert sub.tables[key] is emb.tables[key]
    assert list(sub.numeric) == ["T_coupon_item__discount"]
