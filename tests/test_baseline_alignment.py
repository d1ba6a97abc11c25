"""The aligned feature template of STAR / PEPNet: columns, shared columns, missing values, the print."""

from __future__ import annotations

import io

import pytest
import torch
from baseline_contract import one_thread_fixture

from mtfm.baselines.alignment import AlignedInputs, TaskColumns, align_schema, describe_template, print_template
from mtfm.baselines.common import InputConfig
from mtfm.config import schema_from_dict
from mtfm.model.testing import random_batch, tiny_schema

SCHEMA = tiny_schema()
CONFIG = InputConfig(embedding_dim=4, numeric_dim=3, sequence_dim=8)


_one_thread = one_thread_fixture()


def two_scenario_schema():
    """``brand`` in both scenarios with different sizes (two columns), ``city`` alike in both (one)."""
    city = {"name": "city", "kind": "categorical", "num_embeddings": 9}

    def scenario(name: str, brands: int) -> dict:
        return {"name": name, "table": name, "user_features": [city],
                "item_features": [{"name": "brand", "kind": "categorical", "num_embeddings": brands}],
                "tasks": [{"name": "ctr", "labels": ["click"]}]}

    return schema_from_dict({"window": 100, "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
                             "scenarios": [scenario("A", 5), scenario("B", 7)]}, "<two>")


def test_the_template_is_the_union_with_alike_features_as_one_column():
    template = align_schema(SCHEMA)
    assert [c.name for c in template.columns] == [
        "user.age", "user.vip", "cross.distance",
        "item.item_id", "item.tags", "item.dish_type", "item.price", "item.brand", "item.discount"]
    by_name = {c.name: c for c in template.columns}
    assert by_name["item.item_id"].scenarios == ("feed", "food")
    assert [c.name for c in template.shared()] == ["item.item_id"]
    assert by_name["item.tags"].kind == "multi_categorical" and by_name["item.tags"].scenarios == ("feed",)
    assert [c.name for c in template.filled("coupon")] == ["user.vip", "item.brand", "item.discount"]


def test_a_name_with_different_tables_gives_one_column_per_table():
    template = align_schema(two_scenario_schema())
    assert [(c.name, c.scenarios) for c in template.columns] == [
        ("user.city", ("A", "B")), ("item.brand@A", ("A",)), ("item.brand@B", ("B",))]
    model = AlignedInputs(two_scenario_schema(), CONFIG)
    tables = {model.embeddings.table_of[(f"A:{c}", "brand")] for c in ("item.brand@A", "item.brand@B")}
    assert len(tables) == 2
    assert model.embeddings.tables[model.embeddings.table_of[("A:item.brand@B", "brand")]].num_embeddings == 7


def test_a_shared_column_reads_one_table_also_shared_with_the_sequences():
    model = AlignedInputs(SCHEMA, CONFIG)
    key = model.embeddings.table_of[("A:item.item_id", "item_id")]
    table_of = model.embeddings.table_of
    assert key == table_of[("H:orders", "item_id")] == table_of[("R:recent", "item_id")]
    batch = random_batch(SCHEMA, 6, seed=0)
    out = model(batch)
    table = model.embeddings.tables[key].weight
    for s in ("feed", "food"):  # item_id is the first item column in both
        ids = batch.scenarios[s].item.categorical["item_id"]
        assert torch.equal(out[s]["item"][:, :4], table[ids])


def test_every_scenario_has_the_same_widths():
    model = AlignedInputs(SCHEMA, CONFIG)
    out = model(random_batch(SCHEMA, 6, seed=1))
    for s, parts in out.items():
        assert {p: t.shape[1] for p, t in parts.items()} == model.part_dims
    assert sum(model.field_dims) == model.out_dim
    assert model.part_dims["user"] == 8 and model.part_dims["cross"] == 3


@torch.no_grad()
def test_absent_features_take_the_missing_values_of_the_policy():
    model = AlignedInputs(SCHEMA, CONFIG)
    batch = random_batch(SCHEMA, 8, seed=2)
    out = model(batch)
    food, feed = out["food"], out["feed"]
    n = batch.scenarios["food"].num_rows
    assert n > 1
    # categorical: food lacks user.age and user.vip -> the columns' learned missing vectors
    assert torch.equal(food["user"][:, :4], model.missing["user_age"].expand(n, -1))
    assert torch.equal(food["user"][:, 4:], model.missing["user_vip"].expand(n, -1))
    # numeric: food lacks cross.distance -> the encoder of [0, missing=1]
    enc = model.numeric["cross_distance"]
    assert torch.allclose(food["cross"], enc(torch.tensor([[0.0, 1.0]])).expand(n, -1))
    # present numeric: the encoder of [value, 0]
    x = batch.scenarios["feed"].cross.numeric["distance"]
    assert torch.allclose(feed["cross"], enc(torch.stack([x, torch.zeros_like(x)], 1)))
    # multi-categorical: food lacks item.tags -> its missing vector (not the zeros of an empty bag)
    assert torch.equal(food["item"][:, 4:8], model.missing["item_tags"].expand(n, -1))
    assert not torch.equal(model.missing["item_tags"], torch.zeros(4))
    # a column every scenario fills has no missing vector
    assert "item_item_id" in model.missing  # coupon lacks it
    assert set(AlignedInputs(two_scenario_schema(), CONFIG).missing) == {"item_brand_A", "item_brand_B"}


def test_the_printed_template_names_every_column_and_what_is_missing():
    buf = io.StringIO()
    template = print_template(SCHEMA, file=buf)
    text = buf.getvalue()
    assert text.strip() == describe_template(template)
    assert "9 columns" in text and "1 shared" in text
    for c in template.columns:
        assert c.name in text
    line = next(l for l in text.splitlines() if "item.item_id" in l)
    assert "feed, food" in line and "missing in coupon" in line
    assert "scenario coupon: fills 3 of 9 columns" in text


def test_a_batch_with_an_unknown_scenario_is_refused():
    model = AlignedInputs(SCHEMA.restrict(["feed", "food"]), CONFIG)
    with pytest.raises(KeyError, match="coupon"):
        model(random_batch(SCHEMA, 4, seed=0))


def test_task_columns_place_each_scenarios_tasks_among_the_union_of_task_names():
    def scenario(name: str, tasks: list[str]) -> dict:
        return {"name": name, "table": name, "item_features": [{"name": "x", "kind": "numeric"}],
                "tasks": [{"name": t, "labels": [t]} for t in tasks]}

    schema = schema_from_dict({"window": 100, "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
                               "scenarios": [scenario("A", ["ctr"]), scenario("B", ["cvr", "ctr"])]}, "<tasks>")
    columns = TaskColumns(schema)
    assert columns.task_names == ["ctr", "cvr"] and columns.scenario_index == {"A": 0, "B": 1}
    assert columns("A").tolist() == [0] and columns("B").tolist() == [1, 0]  # B's schema order
    assert columns("B").dtype == torch.long and not columns.state_dict()  # buffers, not saved
    assert [name for name, _ in columns.named_buffers()] == ["tasks_0", "tasks_1"]
