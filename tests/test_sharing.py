"""Embedding sharing is declared (issue 11, item 6): ``share: NAME`` per feature, validated,
printed; nothing is shared by name alone; old checkpoints keep their tables."""

from __future__ import annotations

import pytest

from mtfm.config import SchemaError, load_schema, schema_from_dict
from mtfm.data.sources.synthetic import load_packaged_schema, synthetic_schema
from mtfm.model import MTFM
from mtfm.model.config import ModelConfigError, model_config_from_dict
from mtfm.model.testing import tiny_config, tiny_schema
from mtfm.sharing import format_sharing_plan, legacy_shares, sharing_plan
from mtfm.train.models import build_model


def _campaigns(share_a: str | None = None, share_b: str | None = None, b_size: int = 500, **b_extra) -> dict:
    """Two campaigns whose item_id columns have vocabularies of the same size (unless b_size)."""
    def item(share, size, **extra):
        return {"kind": "categorical", "name": "item_id", "num_embeddings": size,
                **({"share": share} if share else {}), **extra}
    return {
        "window": 3600, "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
        "scenarios": [
            {"name": "A", "table": "a", "item_features": [item(share_a, 500)], "tasks": [{"name": "ctr", "labels": ["click"]}]},
            {"name": "B", "table": "b", "item_features": [item(share_b, b_size, **b_extra)],
             "tasks": [{"name": "ctr", "labels": ["click"]}]},
        ],
    }


def _strip_shares(schema):
    raw = schema.model_dump(mode="json")
    for seq in raw["history"] + raw["realtime"]:
        for f in seq["features"]:
            f.pop("share", None)
    for sc in raw["scenarios"]:
        for group in ("user_features", "cross_features", "item_features"):
            for f in sc[group]:
                f.pop("share", None)
    return schema_from_dict(raw)


def _groups(schema) -> list[list[str]]:
    return sorted(sorted(path for path, _, _ in t.members) for t in sharing_plan(schema))


def test_same_sized_item_vocabularies_get_two_tables_unless_shared():
    config = tiny_config()
    separate = MTFM(schema_from_dict(_campaigns()), config).embeddings
    assert separate.table_of[("T:A:item", "item_id")] != separate.table_of[("T:B:item", "item_id")]
    assert len(separate.tables) == 2
    shared = MTFM(schema_from_dict(_campaigns("items", "items")), config).embeddings
    # "items" is a ModuleDict method, so the table's key gets a "_"
    assert shared.table_of[("T:A:item", "item_id")] == shared.table_of[("T:B:item", "item_id")] == "items_"
    assert len(shared.tables) == 1
    # one side declaring a share name is not enough: the other still has its own table
    half = MTFM(schema_from_dict(_campaigns("items", None)), config).embeddings
    assert len(half.tables) == 2


@pytest.mark.parametrize(("extra", "what"), [
    ({"b_size": 600}, "num_embeddings 500 vs 600"),
    ({"embedding_dim": 8}, "embedding_dim None vs 8"),
])
def test_one_share_name_over_different_encodings_is_a_schema_error_naming_both(extra, what):
    with pytest.raises(SchemaError) as err:
        schema_from_dict(_campaigns("items", "items", **extra), "campaigns.yaml")
    msg = str(err.value)
    assert "campaigns.yaml" in msg and "share 'items'" in msg and what in msg
    assert "scenarios[A].item_features[item_id]" in msg and "scenarios[B].item_features[item_id]" in msg


def test_hash_and_vocabulary_under_one_share_name_is_an_error():
    raw = _campaigns("items", "items")
    raw["scenarios"][1]["item_features"][0] = {"kind": "categorical", "name": "sku", "hash_buckets": 500,
                                                "share": "items"}
    with pytest.raises(SchemaError, match=r"num_embeddings 500 vs None; hash_buckets None vs 500"):
        schema_from_dict(raw)


def test_sharing_plan_printout_names_tables_members_and_counts_the_unshared():
    text = format_sharing_plan(tiny_schema())
    lines = text.splitlines()
    assert lines[0] == ("embedding tables: 7 (2 shared by `share:`, read by 7 features; "
                        "5 unshared features, one table each)")
    assert lines[1] == ("  share 'item_id' (50 rows): history orders.item_id, history clicks.item_id, "
                        "realtime recent.item_id, feed item.item_id, food item.item_id")
    assert lines[2] == "  share 'tags' (7 rows): realtime recent.tags, feed item.tags"
    assert lines[3] == "  unshared (5): history orders.shop, feed user.age, food item.dish_type, coupon user.vip, coupon item.brand"
    assert format_sharing_plan(tiny_schema(), max_unshared=2).splitlines()[3].endswith("feed user.age, ... (+3)")


@pytest.mark.parametrize("num_scenarios", [3, 5])
def test_synthetic_schema_keeps_the_tables_that_sharing_by_name_gave(num_scenarios):
    """The packaged schemas declare `share:` so that their models have exactly the tables the
    old rule (same name and same encoding -> one table) gave."""
    schema = synthetic_schema(num_scenarios)
    assert _groups(schema) == _groups(legacy_shares(_strip_shares(schema), 16))
    model = MTFM(schema, tiny_config(embedding_dim=16))
    assert len(model.embeddings.tables) == len(sharing_plan(schema))


def test_packaged_schemas_keep_their_tables():
    from importlib import resources

    for name in ("synthetic", "kuairand", "movielens"):
        schema = load_schema(str(resources.files("mtfm") / "configs" / f"{name}.yaml"))
        assert _groups(schema) == _groups(legacy_shares(_strip_shares(schema), 16)), name
    plan = {t.share: [p for p, _, _ in t.members] for t in sharing_plan(load_packaged_schema())}
    assert plan["cuisine"] == ["history[orders].features[cuisine]", "history[clicks].features[cuisine]",
                               "realtime[recent_clicks].features[cuisine]", "scenarios[HP].item_features[cuisine]",
                               "scenarios[PHF].item_features[cuisine]", "scenarios[SQS].item_features[cuisine]"]
    assert plan["restaurant_id"] == ["scenarios[HP].item_features[restaurant_id]",
                                     "scenarios[PHF].item_features[restaurant_id]"]


def test_share_embeddings_by_name_is_refused_with_a_pointer_to_share():
    with pytest.raises(ModelConfigError, match="share_embeddings_by_name was removed.*share: NAME"):
        model_config_from_dict({"share_embeddings_by_name": True}, "model.yaml")


def test_old_checkpoint_configs_rebuild_the_old_tables():
    """A checkpoint written before explicit sharing stores ``share_embeddings_by_name`` in its
    model config and a schema without ``share``: it is rebuilt with the old tables, same names."""
    old_schema = _strip_shares(tiny_schema())
    config = tiny_config().model_dump(mode="json")
    old = build_model("mtfm", {**config, "share_embeddings_by_name": True}, old_schema)
    assert set(old.embeddings.tables) == {"item_id", "shop", "tags", "age", "dish_type", "vip", "brand"}
    assert old.embeddings.table_of[("H:clicks", "item_id")] == old.embeddings.table_of[("T:food:item", "item_id")]
    off = build_model("mtfm", {**config, "share_embeddings_by_name": False}, old_schema)
    assert off.embeddings.table_of[("H:clicks", "item_id")] == "H_clicks__item_id"  # the old per-field names
    assert len(off.embeddings.tables) == 12


def test_legacy_rule_keeps_same_named_features_of_different_encodings_apart():
    raw = _campaigns(b_size=600)
    legacy = legacy_shares(schema_from_dict(raw), 16)
    shares = [f.share for _, _, f in legacy.id_features()]
    assert shares == ["item_id", "item_id_"]  # the names the old tables had
