"""The synthetic world: contract (schema, dtypes, determinism, chunking) and planted signals.

Small worlds (~1-3k users) keep this fast; signals are checked with margins several standard
errors wide at that size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtfm.config import CategoricalFeature, DataSchema, NumericFeature, SchemaError, schema_from_dict
from mtfm.data.aggregate import prepare
from mtfm.data.sources import synthetic as syn
from mtfm.data.sources.synthetic import SyntheticConfig, generate, load_source, synthetic_schema, write_parquet
from mtfm.data.validate import validate_raw
from mtfm.metrics import auc, gauc

SCENARIO_TABLES = ["exposures_hp", "exposures_phf", "exposures_sqs"]


@pytest.fixture(scope="module")
def world():
    return generate(SyntheticConfig(users=3000, seed=0))


def _task_label(df: pl.DataFrame, labels: list[str]) -> np.ndarray:
    y = np.ones(df.height, dtype=bool)
    for col in labels:
        y &= df[col].to_numpy().astype(bool)
    return y


def _last_click_before(exposures: pl.DataFrame, clicks: pl.DataFrame) -> pl.Series:
    """Seconds since the user's last click on the same cuisine strictly before each exposure."""
    right = clicks.select("user_id", "cuisine", pl.col("ts").alias("click_ts")).sort("click_ts")
    left = exposures.with_row_index("row").sort("ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # polars cannot verify sortedness per 'by' group
        joined = left.join_asof(right, left_on="ts", right_on="click_ts", by=["user_id", "cuisine"],
                                strategy="backward", allow_exact_matches=False)
    return joined.sort("row").select((pl.col("ts") - pl.col("click_ts")).alias("age"))["age"]


# ---- schema -----------------------------------------------------------------------------------


def test_packaged_yaml_equals_the_code_schema():
    assert syn.load_packaged_schema() == synthetic_schema(3)
    assert syn.packaged_schema_path().read_text() == syn.schema_yaml(synthetic_schema(3))


def test_default_scenarios_have_distinct_feature_schemas_and_paper_tasks():
    schema = synthetic_schema(3)
    assert schema.scenario_names == ["HP", "PHF", "SQS"]
    item_sets = [frozenset(f.name for f in s.item_features) for s in schema.scenarios]
    user_sets = [frozenset(f.name for f in s.user_features) for s in schema.scenarios]
    assert len(set(item_sets)) == 3 and len(set(user_sets)) == 3
    assert not (user_sets[0] & user_sets[1]) and not (user_sets[1] & user_sets[2])
    assert [t.name for t in schema.scenario("HP").tasks] == ["ctr", "ctcvr"]
    assert [t.name for t in schema.scenario("SQS").tasks] == ["ctr", "ctcvr", "imd", "write"]
    assert schema.scenario("SQS").tasks[2].labels == ["click", "conversion", "redeem_30m"]
    assert [s.name for s in schema.history] == ["orders", "clicks"]
    assert [(s.name, s.table) for s in schema.realtime] == [("recent_clicks", "clicks")]
    assert schema.window == syn.DAY
    assert schema.split.test_start - schema.split.valid_start == syn.DAY


def test_extra_scenarios_get_their_own_generated_schema_and_data():
    schema = synthetic_schema(5)
    assert schema.scenario_names == ["HP", "PHF", "SQS", "S4", "S5"]
    s4, s5 = schema.scenario("S4"), schema.scenario("S5")
    assert s4.table != s5.table
    assert s4.item_features != s5.item_features  # style cardinality differs
    assert schema_from_dict(syn.yaml.safe_load(syn.schema_yaml(schema))) == schema
    raw = generate(SyntheticConfig(users=600, seed=3, num_scenarios=5))
    syn.check_compatible(schema, raw.tables)
    for s in ("S4", "S5"):
        df = raw.tables[schema.scenario(s).table]
        assert df.height > 500
        assert 0.01 < df["click"].mean() < 0.08


# ---- determinism and chunking -----------------------------------------------------------------


def test_same_seed_same_tables_and_different_seed_different_tables():
    a = generate(SyntheticConfig(users=700, seed=5, block_users=256))
    b = generate(SyntheticConfig(users=700, seed=5, block_users=256))
    c = generate(SyntheticConfig(users=700, seed=6, block_users=256))
    assert a.tables.keys() == b.tables.keys() == c.tables.keys()
    for name in a.tables:
        assert a.tables[name].equals(b.tables[name]), name
        assert not a.tables[name].equals(c.tables[name]), name


def test_output_does_not_depend_on_chunking(tmp_path):
    cfg = SyntheticConfig(users=1300, seed=2, block_users=256)
    whole = generate(cfg)
    written = write_parquet(cfg, tmp_path, users_per_chunk=512)
    assert syn.load_schema(written.schema_path) == cfg.schema()
    for name, df in whole.tables.items():
        assert len(written.files[name]) == 3  # 6 blocks of 256 users (last one partial), 2 per chunk
        back = pl.concat([pl.read_parquet(p) for p in written.files[name]])
        assert back.equals(df), name
        assert written.rows[name] == df.height
    # Users are a prefix: a smaller world equals the first blocks of a larger one.
    small = generate(SyntheticConfig(users=512, seed=2, block_users=256))
    for name, df in small.tables.items():
        assert whole.tables[name].filter(pl.col("user_id") < 512).equals(df), name


def test_write_parquet_rejects_chunks_that_split_a_block(tmp_path):
    with pytest.raises(ValueError, match="multiple of block_users=256"):
        write_parquet(SyntheticConfig(users=600, block_users=256), tmp_path, users_per_chunk=300)


# ---- contract with aggregation ------------------------------------------------------------------


def test_every_schema_column_exists_with_the_right_dtype(world):
    schema: DataSchema = world.schema
    syn.check_compatible(schema, world.tables)
    for s in schema.scenarios:
        df = world.tables[s.table]
        assert df.null_count().sum_horizontal().item() == 0, s.table
        for f in (*s.user_features, *s.cross_features, *s.item_features):
            dtype = df.schema[f.name]
            if isinstance(f, NumericFeature):
                assert dtype.is_float(), f.name
            elif isinstance(f, CategoricalFeature) and f.num_embeddings is not None:
                assert dtype.is_integer(), f.name
                assert 0 <= df[f.name].min() and df[f.name].max() < f.num_embeddings, f.name
            elif isinstance(f, CategoricalFeature) and f.vocabulary is not None:
                assert set(df[f.name].unique().to_list()) <= set(f.vocabulary), f.name
        for t in s.tasks:
            for label in t.labels:
                assert df.schema[label].is_integer() and set(df[label].unique().to_list()) <= {0, 1}
            p = df[t.oracle_column].to_numpy()
            assert df.schema[t.oracle_column] == pl.Float64 and p.min() > 0 and p.max() < 1
        assert df.select(pl.col("user_id").diff().fill_null(0).min()).item() >= 0  # sorted by user
    for seq in (*schema.history, *schema.realtime):
        df = world.tables[seq.table]
        for f in seq.features:
            assert f.name in df.columns
            if isinstance(f, CategoricalFeature) and f.num_embeddings is not None:
                assert df[f.name].max() < f.num_embeddings
    assert world.tables["exposures_phf"].schema["dish_tags"] == pl.List(pl.Int32)
    assert world.tables["exposures_phf"]["dish_tags"].list.len().max() <= syn.MAX_DISH_TAGS


def test_tables_pass_the_data_layer_validation_and_aggregate_without_drops(world, tmp_path):
    validate_raw(world)
    validate_raw(generate(SyntheticConfig(users=300, seed=1, num_scenarios=5)))
    small = generate(SyntheticConfig(users=400, seed=1))
    manifest = prepare(small, tmp_path)
    assert manifest.dropped == {}
    assert manifest.output_exposures == manifest.input_exposures == sum(small.info["exposures"].values())
    assert all(manifest.splits[s].exposures > 0 for s in ("train", "valid", "test"))


def test_exposures_lie_in_the_exposure_days_and_behaviour_has_a_pre_period(world):
    cfg = SyntheticConfig(users=3000, seed=0)
    end = cfg.start_ts + cfg.days * syn.DAY
    for name in SCENARIO_TABLES:
        ts = world.tables[name]["ts"]
        assert ts.min() >= cfg.start_ts and ts.max() < end
        days = ((ts - cfg.start_ts) // syn.DAY).unique().to_list()
        assert sorted(days) == list(range(cfg.days))  # train, valid and test days all populated
    for name in ("clicks", "orders"):
        pre = world.tables[name].filter(pl.col("ts") < cfg.start_ts)
        assert pre.height > 0 and pre["ts"].min() >= cfg.start_ts - cfg.history_days * syn.DAY


def test_load_source_protocol():
    with pytest.raises(ValueError, match="reads no path"):
        load_source("/tmp/x", None, 100, 0)
    raw = load_source(None, None, 300, 1)
    assert raw.schema == syn.load_packaged_schema()
    assert set(raw.tables) == {"exposures_hp", "exposures_phf", "exposures_sqs", "orders", "clicks"}
    assert raw.origin("clicks") == "synthetic:clicks"
    only_sqs = load_source(None, synthetic_schema(3).restrict(["SQS"]), 300, 1)
    assert set(only_sqs.tables) == {"exposures_sqs", "orders", "clicks"}
    assert only_sqs.tables["exposures_sqs"].equals(raw.tables["exposures_sqs"])


def test_load_source_names_table_and_column_of_an_incompatible_schema():
    raw = synthetic_schema(3).model_dump(mode="json")
    raw["scenarios"][2]["item_features"].append({"kind": "numeric", "name": "shelf_life"})
    raw["scenarios"][0]["item_features"][1] = {"kind": "multi_categorical", "name": "cuisine", "num_embeddings": 12}
    with pytest.raises(SchemaError) as err:
        load_source(None, schema_from_dict(raw), 200, 0)
    assert "exposures_sqs: column 'shelf_life'" in str(err.value)
    assert "exposures_hp: column 'cuisine': expected a list column" in str(err.value)
    with pytest.raises(SchemaError, match=r"split\.valid_start=\d+ lies outside the exposure days"):
        load_source(None, synthetic_schema(3, days=20), 200, 0)
    raw = synthetic_schema(3).model_dump(mode="json")
    raw["scenarios"][0]["name"] = "XYZ"
    with pytest.raises(SchemaError, match="unknown scenario"):
        load_source(None, schema_from_dict(raw), 200, 0)


# ---- rates, volumes, variety --------------------------------------------------------------------


def test_ctr_and_ctcvr_per_scenario_are_in_range(world):
    for s in world.schema.scenarios:
        df = world.tables[s.table]
        ctr = _task_label(df, ["click"]).mean()
        ctcvr = _task_label(df, ["click", "conversion"]).mean()
        assert 0.02 <= ctr <= 0.06, (s.name, ctr)
        assert 0.003 <= ctcvr <= 0.01, (s.name, ctcvr)
    sqs = world.tables["exposures_sqs"]
    imd, write = sqs["redeem_30m"].to_numpy(), sqs["redeem_24h"].to_numpy()
    assert np.all(imd <= write) and np.all(write <= sqs["conversion"].to_numpy())
    assert 0 < imd.sum() < write.sum()


def test_exposure_volume_is_about_8_7_1(world):
    n = np.array([world.tables[t].height for t in SCENARIO_TABLES], dtype=float)
    ratio = n / n[2]
    assert 6.8 <= ratio[0] <= 9.2 and 5.9 <= ratio[1] <= 8.1, ratio


def test_activity_varies_and_item_popularity_is_skewed(world):
    hp, sqs = world.tables["exposures_hp"], world.tables["exposures_sqs"]
    active_days = hp.group_by("user_id").agg(((pl.col("ts") - syn.START_TS) // syn.DAY).n_unique().alias("d"))
    assert active_days["d"].min() < 5 and active_days["d"].max() == 14
    hp_users, sqs_users = set(hp["user_id"].to_list()), set(sqs["user_id"].to_list())
    assert 0.2 < len(hp_users - sqs_users) / len(hp_users) < 0.6  # many HP users never see SQS
    per_item = hp.group_by("restaurant_id").len()["len"].sort(descending=True).to_numpy()
    top = per_item[: max(1, per_item.size // 100)].sum() / per_item.sum()
    assert top > 0.15, top  # top 1% of restaurants get a large share (Zipf)


# ---- time and leakage ---------------------------------------------------------------------------


def test_every_click_and_order_follows_its_exposure(world):
    clicks, orders = world.tables["clicks"], world.tables["orders"]
    pages = []
    for k, name in enumerate(SCENARIO_TABLES, start=1):
        df = world.tables[name]
        item = {"exposures_hp": "restaurant_id", "exposures_phf": "dish_id", "exposures_sqs": "package_id"}[name]
        clicked = df.filter(pl.col("click") == 1).select("user_id", "ts", pl.col(item).alias("item_id"))
        feed_clicks = clicks.filter(pl.col("scenario") == k, pl.col("ts") >= syn.START_TS)
        assert feed_clicks.height == clicked.height
        matched = clicked.join(feed_clicks.rename({"ts": "click_ts"}), on=["user_id", "item_id"]).filter(
            (pl.col("click_ts") - pl.col("ts")).is_between(syn.CLICK_DELAY_S[0], syn.CLICK_DELAY_S[1]))
        assert matched.select("user_id", "ts", "item_id").unique().height == clicked.unique().height
        assert orders.filter(pl.col("scenario") == k, pl.col("ts") >= syn.START_TS).height == df["conversion"].sum()
        pages.append(df.select("user_id", "ts").unique())
        assert df.select("request_id", item).unique().height == df.height  # no item twice in a page
        assert df.select("user_id", "ts").unique().height == df["request_id"].n_unique()
    # Feed pages of a user (all scenarios) are more than the longest click delay apart.
    gaps = pl.concat(pages).unique().sort("user_id", "ts").select(
        pl.col("ts").diff().over("user_id").alias("gap")).drop_nulls()
    assert gaps["gap"].min() >= syn.MIN_PAGE_GAP_S


def test_cross_and_user_features_are_computed_from_strictly_earlier_events(world):
    hp, orders = world.tables["exposures_hp"], world.tables["orders"]
    busy = hp.group_by("user_id").len().sort("len", descending=True)["user_id"][:3].to_list()
    for user in busy:
        ex = hp.filter(pl.col("user_id") == user)
        own_orders = orders.filter(pl.col("user_id") == user)
        for row in ex.iter_rows(named=True):
            past = ex.filter(pl.col("ts") < row["ts"], pl.col("cuisine") == row["cuisine"])
            prior = syn.CTR_PRIOR_WEIGHT * syn.CTR_PRIOR
            want_ctr = (past["click"].sum() + prior) / (past.height + syn.CTR_PRIOR_WEIGHT)
            assert row["hp_user_cuisine_ctr"] == pytest.approx(want_ctr, rel=1e-5)
            want_orders = own_orders.filter(pl.col("ts") < row["ts"], pl.col("cuisine") == row["cuisine"]).height
            assert row["hp_user_cuisine_orders"] == want_orders
            day_start = row["ts"] - (row["ts"] - syn.START_TS) % syn.DAY
            week = own_orders.filter(pl.col("ts") < day_start, pl.col("ts") >= day_start - 7 * syn.DAY).height
            assert row["hp_orders_7d"] == week


# ---- planted signals ----------------------------------------------------------------------------


def test_oracle_is_informative_and_calibrated(world):
    for s in world.schema.scenarios:
        df = world.tables[s.table]
        for t in s.tasks:
            y, p = _task_label(df, t.labels), df[t.oracle_column].to_numpy()
            assert auc(y, p) > 0.75, (s.name, t.name)
            assert gauc(df["user_id"].to_numpy(), y, p).gauc > 0.65, (s.name, t.name)
            se = math.sqrt(np.sum(p * (1 - p))) / y.size
            assert abs(y.mean() - p.mean()) < 4 * se + 1e-4, (s.name, t.name)


def _cuisine_profile_auc(world, sources: list[str], target: str) -> float:
    """AUC on the target's valid+test clicks of the user's train-period click share per cuisine."""
    cut = world.schema.split.valid_start
    train = pl.concat([world.tables[t].filter(pl.col("ts") < cut).select("user_id", "cuisine", "click")
                       for t in sources])
    per_uc = train.group_by("user_id", "cuisine").agg(pl.col("click").sum().alias("n_uc"))
    per_u = train.group_by("user_id").agg(pl.col("click").sum().alias("n_u"))
    ev = (world.tables[target].filter(pl.col("ts") >= cut).select("user_id", "cuisine", "click")
          .join(per_uc, on=["user_id", "cuisine"], how="left").join(per_u, on="user_id", how="left")
          .fill_null(0))
    score = ((ev["n_uc"] + 0.5) / (ev["n_u"] + 6)).to_numpy()
    return gauc(ev["user_id"].to_numpy(), ev["click"].to_numpy(), score).gauc


def test_other_scenarios_predict_sqs_clicks(world):
    own = _cuisine_profile_auc(world, ["exposures_sqs"], "exposures_sqs")
    others = _cuisine_profile_auc(world, ["exposures_hp", "exposures_phf"], "exposures_sqs")
    together = _cuisine_profile_auc(world, SCENARIO_TABLES, "exposures_sqs")
    assert others > 0.58, others  # HP/PHF taste alone predicts SQS clicks
    assert together > own + 0.03, (own, together)  # multi-scenario data helps the small scenario
    hp_own = _cuisine_profile_auc(world, ["exposures_hp"], "exposures_hp")
    hp_together = _cuisine_profile_auc(world, SCENARIO_TABLES, "exposures_hp")
    assert together - own > hp_together - hp_own  # ... and helps SQS most


def test_recent_same_cuisine_click_raises_click_probability():
    """Same world with and without the real-time effect: the only change is on 'recent' rows."""
    on = generate(SyntheticConfig(users=1500, seed=4))
    off = generate(SyntheticConfig(users=1500, seed=4, realtime_boost=0.0))
    lifts = {}
    for name in SCENARIO_TABLES:
        a, b = on.tables[name], off.tables[name]
        age = _last_click_before(a, on.tables["clicks"]).to_numpy()
        recent = ~np.isnan(age.astype(float)) & (np.nan_to_num(age.astype(float), nan=1e18) <= 1800)
        logit = lambda p: np.log(p / (1 - p))  # noqa: E731
        shift = logit(a["p_ctr"].to_numpy()) - logit(b["p_ctr"].to_numpy())
        assert 0.01 < recent.mean() < 0.2
        np.testing.assert_allclose(shift, np.where(recent, 1.2, 0.0), atol=1e-9)
        y = a["click"].to_numpy()
        lifts[name] = y[recent].mean() / y[~recent].mean()
    assert min(lifts.values()) > 3.0, lifts


# ---- vectorised helpers against plain references ----------------------------------------------


def test_catalog_samplers_follow_cuisine_and_popularity():
    rng = np.random.default_rng(0)
    n = 300
    cuisine = rng.integers(0, syn.NUM_CUISINES, n)
    cuisine[: syn.NUM_CUISINES] = np.arange(syn.NUM_CUISINES)
    pop = rng.pareto(1.5, n) + 0.01
    cat = syn._Catalog(cuisine, np.zeros(n, int), np.zeros(n), np.zeros(n), pop)
    want = rng.integers(0, syn.NUM_CUISINES, 200_000)
    got = cat.sample_in_cuisine(want, rng.random(want.size))
    assert np.array_equal(cuisine[got], want)
    c3 = np.flatnonzero(cuisine == 3)
    freq = np.bincount(got[want == 3], minlength=n)[c3] / np.sum(want == 3)
    np.testing.assert_allclose(freq, pop[c3] / pop[c3].sum(), atol=0.01)
    popular = cat.sample_popular(rng.random(200_000))
    np.testing.assert_allclose(np.bincount(popular, minlength=n) / popular.size, pop / pop.sum(), atol=0.005)


def test_row_sampler_draws_each_row_from_its_own_distribution():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=4)
    rows = np.repeat(np.arange(4), 50_000)
    got = syn._sample_from_rows(syn._row_cdf_sampler(probs), 5, rows, rng.random(rows.size))
    for r in range(4):
        np.testing.assert_allclose(np.bincount(got[rows == r], minlength=5) / 50_000, probs[r], atol=0.01)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 6), st.booleans()),
                min_size=1, max_size=40))
def test_past_ctr_and_counts_match_a_brute_force_loop(events):
    user, cuisine, ts, click = (np.array(x) for x in zip(*events))
    span = 100
    got = syn._past_ctr(user, cuisine, ts, click, span, prior=syn.CTR_PRIOR)
    keys = np.sort((user * syn.NUM_CUISINES + cuisine) * span + ts)
    g = user * syn.NUM_CUISINES + cuisine
    counts = syn._count_before(keys, g, g * span + ts, span)
    for i in range(len(events)):
        past = (user == user[i]) & (cuisine == cuisine[i]) & (ts < ts[i])
        want = (click[past].sum() + syn.CTR_PRIOR_WEIGHT * syn.CTR_PRIOR) / (past.sum() + syn.CTR_PRIOR_WEIGHT)
        assert got[i] == pytest.approx(want)
        assert counts[i] == past.sum()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=60), st.integers(0, 2**32 - 1))
def test_guided_cdf_equals_searchsorted(weights, seed):
    cdf = np.cumsum(weights) / np.sum(weights)
    cdf[-1] = 1.0
    x = np.random.default_rng(seed).random(2000)
    x[:3] = [0.0, cdf[0], np.nextafter(1.0, 0.0)]  # bucket and item edges
    want = np.minimum(np.searchsorted(cdf, x, side="right"), cdf.size - 1)
    assert np.array_equal(syn._GuidedCdf(cdf, 1.0)(x), want)


def test_sorted_search_equals_searchsorted():
    rng = np.random.default_rng(3)
    keys = np.sort(rng.integers(0, 1000, 500))
    queries = rng.integers(-5, 1005, 3000)
    got = syn._sorted_search(keys, queries, np.argsort(queries, kind="stable"))
    assert np.array_equal(got, np.searchsorted(keys, queries, side="left"))


def test_oracle_summary_and_command_line(world, tmp_path, capsys):
    summary = syn.oracle_summary(world, since=world.schema.split.test_start)
    assert summary.select("scenario", "task").rows() == [
        (s.name, t.name) for s in world.schema.scenarios for t in s.tasks]
    hp = world.tables["exposures_hp"].filter(pl.col("ts") >= world.schema.split.test_start)
    assert summary.row(0, named=True)["rate"] == pytest.approx(hp["click"].mean())
    assert syn.main(["--users", "300", "--block-users", "128", "--users-per-chunk", "256", "--out", str(tmp_path)]) == 0
    assert "exposures_per_s" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "clicks").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert syn.load_schema(tmp_path / "schema.yaml") == synthetic_schema(3)
