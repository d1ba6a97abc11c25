"""KuaiRand-Pure source: tab mapping, counts, past-only features, missing codes, bad input.

The real logs are not on these machines. Every test here runs on a fully generated folder
(side tables + logs in the official schema, written at run time); the tests marked "real
side tables" use the shared user/video tables with generated logs and skip when absent.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest

from mtfm.config import SchemaError, schema_from_dict
from mtfm.data.sources import kuairand
from mtfm.data.sources.tabular import SourceFileError, packaged_schema, scenario_columns, sequence_columns
from mtfm.data.validate import validate_raw


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kuairand_generated")
    users, videos = kuairand.write_sample_side_tables(out, n_users=120, n_videos=80, seed=3)
    return kuairand.write_sample_logs(out, users, videos, n_rows=3_000, seed=3)


@pytest.fixture()
def copy_of_generated(generated: Path, tmp_path: Path) -> Path:
    out = tmp_path / "kr"
    out.mkdir()
    for f in generated.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def real_side_tables(tmp_path_factory) -> Path:
    try:
        kuairand.locate(None)
    except FileNotFoundError as err:
        pytest.skip(f"KuaiRand-Pure side tables not available here: {err}")
    return kuairand.write_sample_logs(tmp_path_factory.mktemp("kuairand_real"), n_rows=4_000, seed=1)


def _logs(folder: Path) -> pl.DataFrame:
    return pl.concat([pl.read_csv(p) for p in sorted(folder.glob("log_standard_*.csv"))])


def _total_exposures(raw) -> int:
    return sum(raw.tables[s.table].height for s in raw.schema.scenarios)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def test_packaged_schema_maps_tabs_and_scenarios_differ():
    schema = packaged_schema("kuairand")
    assert kuairand.tab_mapping(schema) == {1: "tab1", 0: "tab0", 4: "tab4"}
    assert schema.time.unit == "ms" and schema.window == 86_400_000
    assert len({tuple(f.name for f in s.item_features) for s in schema.scenarios}) == 3
    assert len({tuple(f.name for f in s.user_features) for s in schema.scenarios}) == 3


def _schema_dict() -> dict:
    return packaged_schema("kuairand").model_dump(mode="json")


def test_tab_mapping_rejects_bad_table_names_and_double_mapping():
    d = _schema_dict()
    d["scenarios"][0]["table"] = "featured"
    with pytest.raises(SchemaError, match="featured"):
        kuairand.tab_mapping(schema_from_dict(d))
    d = _schema_dict()
    d["scenarios"][1]["table"] = "tab_0_1"
    with pytest.raises(SchemaError, match="tab 1 is mapped to both"):
        kuairand.tab_mapping(schema_from_dict(d))


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def test_sample_logs_have_the_official_columns_and_label_rules(generated: Path):
    files = sorted(p.name for p in generated.glob("log_standard_*.csv"))
    assert files == sorted(kuairand.LOG_FILES)
    for path in generated.glob("log_standard_*.csv"):
        assert tuple(pl.read_csv(path, n_rows=0).columns) == kuairand.LOG_COLUMNS
    log = _logs(generated)
    assert log.height == 3_000
    play, dur = log["play_time_ms"], log["duration_ms"]
    valid_play = ((dur <= 7_000) & (play >= dur)) | ((dur > 7_000) & (play > 7_000))
    long_view = ((dur <= 18_000) & (play >= dur)) | ((dur > 18_000) & (play >= 18_000))
    assert (log["is_click"] == valid_play.cast(pl.Int64)).all()
    assert (log["long_view"] == long_view.cast(pl.Int64)).all()
    first = pl.read_csv(generated / kuairand.LOG_FILES[0])
    assert first["date"].max() <= 20220421 < pl.read_csv(generated / kuairand.LOG_FILES[1])["date"].min()


def test_sample_logs_are_deterministic_by_seed(generated: Path, tmp_path: Path):
    users, videos = generated / kuairand.USER_FILE, generated / kuairand.VIDEO_FILE
    a = kuairand.write_sample_logs(tmp_path / "a", users, videos, n_rows=500, seed=7)
    b = kuairand.write_sample_logs(tmp_path / "b", users, videos, n_rows=500, seed=7)
    c = kuairand.write_sample_logs(tmp_path / "c", users, videos, n_rows=500, seed=8)
    assert _logs(a).equals(_logs(b))
    assert not _logs(a).equals(_logs(c))


# --------------------------------------------------------------------------------------------
# Reading a generated folder (always runs)
# --------------------------------------------------------------------------------------------


def test_counts_add_up_and_rows_follow_the_tab_mapping(generated: Path):
    raw = kuairand.load_source(str(generated), None, None, seed=0)
    log = _logs(generated)
    mapping = kuairand.tab_mapping(raw.schema)
    for spec in raw.schema.scenarios:
        tabs = {t for t, name in mapping.items() if name == spec.name}
        table = raw.tables[spec.table]
        assert set(table["tab"].unique().to_list()) == tabs
        assert table.height == log.filter(pl.col("tab").is_in(sorted(tabs))).height
    unmapped = log.filter(~pl.col("tab").is_in(sorted(mapping))).height
    assert unmapped > 0 and raw.pre_dropped == {"unmapped_tab": unmapped}
    assert _total_exposures(raw) + raw.pre_dropped["unmapped_tab"] == log.height
    assert raw.tables["clicks"].height == int(log["is_click"].sum())
    assert raw.info["tab_counts"] == {str(t): n for t, n in log.group_by("tab").len().sort("tab").iter_rows()}


def test_tables_carry_the_schema_columns_without_nulls(generated: Path):
    raw = kuairand.load_source(str(generated), None, None, seed=0)
    for spec in raw.schema.scenarios:
        table = raw.tables[spec.table]
        assert table.columns == [*scenario_columns(raw.schema, spec), "tab"]
        assert table.null_count().sum_horizontal().item() == 0
    for seq in [*raw.schema.history, *raw.schema.realtime]:
        assert set(sequence_columns(raw.schema, seq)) <= set(raw.tables[seq.table].columns)
    assert raw.tables["clicks"].null_count().sum_horizontal().item() == 0


def test_tables_pass_the_data_layer_checks(generated: Path):
    validate_raw(kuairand.load_source(str(generated), None, None, seed=0))  # dtypes, id ranges, labels


def test_missing_codes_become_category_zero(generated: Path):
    raw = kuairand.load_source(str(generated), None, None, seed=0)
    users = pl.read_csv(generated / kuairand.USER_FILE)
    got = raw.tables["tab_0"].select("user_id", "is_live_streamer_id", "onehot_feat4_id").unique()
    joined = got.join(users.select("user_id", "is_live_streamer", "onehot_feat4"), on="user_id")
    expect_live = pl.when(pl.col("is_live_streamer") == -124).then(0).otherwise(pl.col("is_live_streamer") + 1)
    expect_feat4 = pl.when(pl.col("onehot_feat4").is_null()).then(0).otherwise(pl.col("onehot_feat4") + 1)
    check = joined.select(
        (pl.col("is_live_streamer_id") == expect_live).all().alias("live"),
        (pl.col("onehot_feat4_id") == expect_feat4.cast(pl.Int64)).all().alias("feat4"),
        (pl.col("is_live_streamer") == -124).any().alias("has_missing_live"),
        pl.col("onehot_feat4").is_null().any().alias("has_missing_feat4"),
    )
    assert check.row(0) == (True, True, True, True)


def test_prior_features_use_only_strictly_earlier_rows(generated: Path):
    raw = kuairand.load_source(str(generated), None, None, seed=0)
    log = _logs(generated)
    by_user: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for user, t, tab, click in log.select("user_id", "time_ms", "tab", "is_click").iter_rows():
        by_user[user].append((t, tab, click))
    table = raw.tables["tab_0"]
    for user, t, exposures, tab_ctr in table.head(200).select(
        "user_id", "time_ms", "user_prior_exposures", "user_tab_prior_ctr"
    ).iter_rows():
        earlier = [r for r in by_user[user] if r[0] < t]
        same_tab = [r[2] for r in earlier if r[1] == 0]
        assert exposures == len(earlier)
        assert tab_ctr == pytest.approx((sum(same_tab) + 1) / (len(same_tab) + 2))


def test_custom_mapping_groups_tabs(generated: Path):
    d = _schema_dict()
    d["scenarios"][2]["table"] = "tab_2_3"
    d["scenarios"][2]["name"] = "small_tabs"
    raw = kuairand.load_source(str(generated), schema_from_dict(d), None, seed=0)
    log = _logs(generated)
    assert set(raw.tables["tab_2_3"]["tab"].unique().to_list()) == {2, 3}
    assert raw.pre_dropped["unmapped_tab"] == log.filter(~pl.col("tab").is_in([0, 1, 2, 3])).height
    assert _total_exposures(raw) + raw.pre_dropped["unmapped_tab"] == log.height


def test_users_limit_keeps_first_ids_of_the_log(generated: Path):
    raw = kuairand.load_source(str(generated), None, users=10, seed=0)
    first = _logs(generated)["user_id"].unique().sort().head(10).to_list()
    kept = {u for s in raw.schema.scenarios for u in raw.tables[s.table]["user_id"].to_list()}
    assert kept <= set(first) and raw.info["users"] == 10
    n = _logs(generated).filter(pl.col("user_id").is_in(first)).height
    assert _total_exposures(raw) + raw.pre_dropped["unmapped_tab"] == n == raw.info["log_rows_kept"]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _rewrite(path: Path, edit) -> None:
    edit(pl.read_csv(path, infer_schema=False)).write_csv(path)


def test_missing_logs_are_explained(copy_of_generated: Path):
    for p in copy_of_generated.glob("log_standard_*.csv"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"no log_standard_\*\.csv"):
        kuairand.load_source(str(copy_of_generated), None, None, seed=0)


def test_missing_video_table_is_named(copy_of_generated: Path):
    (copy_of_generated / kuairand.VIDEO_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"video_features_basic_\*\.csv"):
        kuairand.load_source(str(copy_of_generated), None, None, seed=0)


def test_log_without_tab_names_file_and_column(copy_of_generated: Path):
    path = copy_of_generated / kuairand.LOG_FILES[1]
    _rewrite(path, lambda df: df.drop("tab"))
    with pytest.raises(SourceFileError, match=rf"{kuairand.LOG_FILES[1]}: missing column\(s\) \['tab'\]"):
        kuairand.load_source(str(copy_of_generated), None, None, seed=0)


@pytest.mark.parametrize(
    ("column", "value", "pattern"),
    [
        ("is_click", "yes", r"column 'is_click' line 5: expected an integer, got 'yes'"),
        ("is_click", "2", r"column 'is_click' line 5: expected 0 or 1, got 2"),
        ("time_ms", "", r"column 'time_ms' line 5: empty value"),
        ("video_id", "999999", r"column 'video_id' line 5: id 999999 is not in .*video_features_basic_pure\.csv"),
        ("user_id", "999999", r"column 'user_id' line 5: id 999999 is not in .*user_features_pure\.csv"),
        ("tab", "-1", r"column 'tab' line 5: must not be negative"),
    ],
)
def test_bad_log_values_name_file_column_and_line(copy_of_generated: Path, column: str, value: str, pattern: str):
    path = copy_of_generated / kuairand.LOG_FILES[0]
    _rewrite(path, lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(value))
                                              .otherwise(pl.col(column)).alias(column)))  # fmt: skip
    with pytest.raises(SourceFileError, match=rf"{kuairand.LOG_FILES[0]}: {pattern}"):
        kuairand.load_source(str(copy_of_generated), None, None, seed=0)


def test_bad_tag_is_named(copy_of_generated: Path):
    path = copy_of_generated / kuairand.VIDEO_FILE
    _rewrite(path, lambda df: df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("7,x"))
                                              .otherwise(pl.col("tag")).alias("tag")))  # fmt: skip
    with pytest.raises(SourceFileError, match=r"video_features_basic_pure\.csv: column 'tag' line 2"):
        kuairand.load_source(str(copy_of_generated), None, None, seed=0)


# --------------------------------------------------------------------------------------------
# Real side tables with generated logs (skipped when absent)
# --------------------------------------------------------------------------------------------


def test_real_side_tables_load(real_side_tables: Path):
    raw = kuairand.load_source(str(real_side_tables), None, None, seed=0)
    log = _logs(real_side_tables)
    assert _total_exposures(raw) + raw.pre_dropped["unmapped_tab"] == log.height
    for spec in raw.schema.scenarios:
        assert raw.tables[spec.table].null_count().sum_horizontal().item() == 0
    # The real table writes a missing is_live_streamer as -124 for most users: category 0.
    live = raw.tables["tab_0"]["is_live_streamer_id"]
    assert set(live.unique().to_list()) <= {0, 2} and (live == 0).any()
    validate_raw(raw)
    videos = pl.read_csv(real_side_tables / kuairand.VIDEO_FILE)
    assert raw.tables["tab_1"]["video_id"].is_in(videos["video_id"].implode()).all()


def test_cli_writes_a_loadable_folder(tmp_path: Path):
    assert kuairand.main([str(tmp_path / "kr"), "--rows", "400", "--generate-side-tables", "--seed", "2"]) == 0
    raw = kuairand.load_source(str(tmp_path / "kr"), None, None, seed=0)
    assert _total_exposures(raw) + raw.pre_dropped["unmapped_tab"] == 400
