"""The service's behaviour store (SQLite): rows read back equal the source's, scores through the
store equal inline behaviour and offline `mtfm predict`, appended actions reach the next score
and invalidate the prefix cache, and bad appends leave the file as it was."""

from __future__ import annotations

import sqlite3

import polars as pl
import pytest
from serve_fixtures import behaviour_rows, candidate_of, served  # noqa: F401 -- the session fixture

from mtfm.config import schema_from_dict
from mtfm.data.validate import DataError
from mtfm.serve.predict import predict_split
from mtfm.serve.store import BehaviourStore, build_store, open_or_build_store


def _count(store: BehaviourStore, table: str) -> int:
    with sqlite3.connect(store.path) as conn:
        return conn.execute(f'SELECT count(*) FROM "b:{table}"').fetchone()[0]


def test_a_users_rows_read_back_are_the_source_rows_with_their_dtypes(served):
    store = BehaviourStore(served.store_path)
    assert set(store.tables) == {"clicks", "orders"}
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for user in (0, 7, 33):
        rows = store.user_rows(user)
        for table, frame in rows.items():
            source = served.raw.tables[table].filter(pl.col("user_id") == user).select(frame.columns)
            assert frame.schema == source.schema
            assert frame.equals(source) and len(frame) > 0
        cut = int(rows["clicks"]["ts"][len(rows["clicks"]) // 2])
        assert store.user_rows(user, before=cut)["clicks"]["ts"].max() < cut
    assert all(len(f) == 0 for f in store.user_rows(10**9).values())


def test_list_and_float_columns_round_trip(tmp_path):
    schema = schema_from_dict({
        "window": 100, "split": {"valid_fraction": 0.2, "test_fraction": 0.2},
        "scenarios": [{"name": "S", "table": "s", "item_features": [{"kind": "categorical", "name": "item",
                                                                     "num_embeddings": 9}],
                       "tasks": [{"name": "ctr", "labels": ["click"]}]}],
        "history": [{"name": "h", "table": "acts", "max_len": 4, "features": [
            {"kind": "multi_categorical", "name": "tags", "num_embeddings": 9},
            {"kind": "numeric", "name": "amount"}]}],
    })
    acts = pl.DataFrame({"user_id": [1, 1, 2], "ts": [5, 3, 4], "tags": [[1, 2], [], [8]],
                         "amount": [0.1, 2.5, -1.0]}, schema_overrides={"tags": pl.List(pl.Int32), "amount": pl.Float32})
    exposures = pl.DataFrame({"user_id": [1], "ts": [6], "item": [3], "click": [1]},
                             schema_overrides={"item": pl.Int16})
    store = build_store({"acts": acts, "s": exposures}, schema, tmp_path / "b.sqlite", "fp")
    assert store.user_rows(1)["acts"].equals(acts.filter(pl.col("user_id") == 1))
    assert store.request_columns == {"S": {"item": pl.Int16()}}
    with pytest.raises(FileExistsError, match="exists"):
        build_store({"acts": acts, "s": exposures}, schema, tmp_path / "b.sqlite", "fp")


def test_scores_through_the_store_equal_inline_behaviour_and_offline_predict(served, tmp_path):
    pred = predict_split(served.run, served.data, "test", tmp_path / "p.parquet")
    scorer = served.scorer()
    checked = 0
    for scenario in ("HP", "PHF", "SQS"):
        for r in pred.filter(pl.col("scenario") == scenario).head(3).iter_rows(named=True):
            cand = candidate_of(served.raw, r["source_table"], r["source_row"],
                                list(scorer.request_columns[scenario]))
            stored = scorer.score(scenario, r["user_id"], [cand], timestamp=r["ts"])
            inline = scorer.score(scenario, r["user_id"], [cand], timestamp=r["ts"],
                                  behaviour=behaviour_rows(served.raw, scorer.store, r["user_id"]))
            assert inline.prefix_cache == "off" and stored.prefix_cache in ("hit", "miss")
            for task, values in stored.scores.items():
                assert values[0] == pytest.approx(inline.scores[task][0], abs=1e-5)
                assert values[0] == pytest.approx(r[f"score.{task}"], abs=1e-5)
                checked += 1
    assert checked >= 9 * 2


def test_appended_actions_reach_the_next_score_and_invalidate_the_cache(served):
    store = served.fresh_store("append")
    scorer = served.scorer(store)
    user, scenario = 5, "HP"
    ts = int(served.raw.tables["exposures_hp"].filter(pl.col("user_id") == user)["ts"].max()) + 60
    cand = candidate_of(served.raw, "exposures_hp", 0, list(scorer.request_columns[scenario]))
    first = scorer.score(scenario, user, [cand, cand], timestamp=ts)
    assert scorer.score(scenario, user, [cand, cand], timestamp=ts).prefix_cache == "hit"
    entries = len(scorer.cache)
    click = {"ts": ts - 30, "scenario": 1, "item_id": 1000123, "cuisine": 3, "price_bucket": 2}
    assert scorer.append_actions("clicks", user, [click]) == 1
    assert len(scorer.cache) == entries - 1 and store.user_version(user) == 1
    after = scorer.score(scenario, user, [cand, cand], timestamp=ts)
    assert after.prefix_cache == "miss" and after.scores != first.scores  # R holds the new click
    inline = behaviour_rows(served.raw, store, user)
    inline["clicks"].append({"user_id": user, **click})
    same = scorer.score(scenario, user, [cand, cand], timestamp=ts, behaviour=inline)
    for task in after.scores:
        assert after.scores[task] == pytest.approx(same.scores[task], abs=1e-5)


@pytest.mark.parametrize("action, field", [
    ({"ts": 5, "scenario": 9, "item_id": 1, "cuisine": 3, "price_bucket": 2}, "scenario"),  # id out of range
    ({"ts": 5, "scenario": "1", "item_id": 1, "cuisine": 3, "price_bucket": 2}, "actions[0].scenario"),
    ({"ts": 5, "scenario": 1, "item_id": 1, "cuisine": 3}, "price_bucket"),
    ({"ts": 5, "scenario": 1, "item_id": 1, "cuisine": 3, "price_bucket": 2, "x": 1}, "'x'"),
    ({"ts": -5, "scenario": 1, "item_id": 1, "cuisine": 3, "price_bucket": 2}, "ts"),
    ({"ts": 5, "user_id": 99, "scenario": 1, "item_id": 1, "cuisine": 3, "price_bucket": 2}, "user_id"),
])
def test_a_bad_append_is_refused_naming_the_field_and_leaves_the_store_as_it_was(served, action, field):
    store = served.fresh_store("bad")
    scorer = served.scorer(store)
    before = _count(store, "clicks")
    good = {"ts": 5, "scenario": 1, "item_id": 1, "cuisine": 3, "price_bucket": 2}
    with pytest.raises(DataError, match=field.replace("[", r"\[").replace("]", r"\]")):
        scorer.append_actions("clicks", 3, [good, action] if field != "actions[0].scenario" else [action, good])
    assert _count(store, "clicks") == before and store.user_version(3) == 0
    with pytest.raises(DataError, match="table: unknown behaviour table"):
        scorer.append_actions("nope", 3, [good])
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.path.unlink()


def test_a_store_of_other_data_is_refused_until_rebuilt(served, tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(served.store_path) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
        dst.execute("UPDATE meta SET value = 'elsewhere' WHERE key = 'fingerprint'")
    with pytest.raises(ValueError, match="other data"):
        open_or_build_store(served.data, path)
    assert open_or_build_store(served.data, path, rebuild=True).fingerprint != "elsewhere"
