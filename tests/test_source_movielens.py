"""MovieLens-100K source: scenario rule, counts, labels, past-only features, bad input.

Real-data tests read the data set in place (``MTFM_MOVIELENS_PATH`` or ``../shared/data/
movielens-100k`` next to the repository) and skip when it is absent. Every other test writes a
small generated data set in the same file format (nothing of MovieLens is copied: its licence
forbids redistribution), so the reader logic is always tested.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mtfm.config import SchemaError, schema_from_dict
from mtfm.data.sources import movielens
from mtfm.data.validate import validate_raw
from mtfm.data.sources.tabular import SourceFileError, packaged_schema, scenario_columns, sequence_columns


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_dir() -> Path:
    try:
        return movielens.locate(None)
    except FileNotFoundError as err:
        pytest.skip(f"MovieLens-100K not available here: {err}")


@pytest.fixture(scope="module")
def real(real_dir: Path):
    return movielens.load_source(str(real_dir), None, None, seed=0)


def _read_ratings(folder: Path) -> list[tuple[int, int, int, int]]:
    """u.data parsed with plain Python: the independent reference for the checks below."""
    rows = []
    for line in (folder / "u.data").read_text().splitlines():
        user, movie, rating, ts = line.split("\t")
        rows.append((int(user), int(movie), int(rating), int(ts)))
    return rows


def _read_families(folder: Path) -> dict[int, str | None]:
    families = {}
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        flags = [int(f) for f in fields[5:]]
        families[int(fields[0])] = movielens.family_of({g for g, f in zip(movielens.GENRES, flags) if f})
    return families


def write_tiny_movielens(folder: Path, n_users: int = 25, n_movies: int = 30, n_ratings: int = 500, seed: int = 0) -> Path:
    """A generated data set in the ML-100K file format (random values, no MovieLens content)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    occupations = [f"job{i}" for i in range(5)]
    (folder / "u.occupation").write_text("\n".join(occupations) + "\n")
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(movielens.GENRES)) + "\n")
    users = [
        f"{u}|{rng.integers(10, 70)}|{rng.choice(['M', 'F'])}|{rng.choice(occupations)}|{rng.choice(['12345', 'T8H1N', ''])}"
        for u in range(1, n_users + 1)
    ]
    (folder / "u.user").write_text("\n".join(users) + "\n")
    items = []
    for m in range(1, n_movies + 1):
        flags = (rng.random(len(movielens.GENRES)) < 0.15).astype(int)
        flags[0] = 0
        if m == n_movies:  # one movie with no genre but "unknown": it has no family
            flags[:] = 0
            flags[0] = 1
        date = "" if m == 1 else f"01-Jan-{rng.integers(1925, 1999)}"
        items.append("|".join([str(m), f"Film é {m} (1990)", date, "", "http://x", *map(str, flags)]))
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    base = 880_000_000
    ratings = [
        f"{rng.integers(1, n_users + 1)}\t{rng.integers(1, n_movies + 1)}\t{rng.integers(1, 6)}\t{base + rng.integers(0, 90) * 3600}"
        for _ in range(n_ratings)
    ]
    (folder / "u.data").write_text("\n".join(ratings) + "\n")
    return folder


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny_movielens(tmp_path / "ml")


def _total_exposures(raw) -> int:
    return sum(raw.tables[s.table].height for s in raw.schema.scenarios)


# --------------------------------------------------------------------------------------------
# Schema and rule (no data needed)
# --------------------------------------------------------------------------------------------


def test_packaged_schema_validates_and_scenarios_are_not_aligned():
    schema = packaged_schema("movielens")
    assert [s.table for s in schema.scenarios] == [f"ratings_{f}" for f in movielens.FAMILIES]
    item_sets = {tuple(f.name for f in s.item_features) for s in schema.scenarios}
    user_sets = {tuple(f.name for f in s.user_features) for s in schema.scenarios}
    assert len(item_sets) == len(schema.scenarios) and len(user_sets) == len(schema.scenarios)
    assert {seq.table for seq in [*schema.history, *schema.realtime]} == {"ratings"}


@pytest.mark.parametrize(
    ("genres", "family"),
    [
        ({"Animation", "Action"}, "family"),  # kids' films win over action
        ({"Children's", "Drama"}, "family"),
        ({"Action", "Drama", "Comedy"}, "thrill"),
        ({"Crime", "Romance"}, "thrill"),
        ({"Comedy", "Romance"}, "drama"),  # romantic comedies are drama/romance
        ({"Documentary"}, "drama"),
        ({"Comedy", "Musical"}, "family"),
        ({"unknown"}, None),
        (set(), None),
    ],
)
def test_family_rule_priority(genres, family):
    assert movielens.family_of(genres) == family


def test_every_genre_but_unknown_belongs_to_a_family():
    assert {g for _, members in movielens.FAMILY_RULES for g in members} == set(movielens.GENRES) - {"unknown"}


# --------------------------------------------------------------------------------------------
# Generated data in the ML-100K format (always runs)
# --------------------------------------------------------------------------------------------


def test_tiny_counts_add_up_and_assignment_follows_rule(tiny: Path):
    raw = movielens.load_source(str(tiny), None, None, seed=0)
    ratings, families = _read_ratings(tiny), _read_families(tiny)
    expected = defaultdict(int)
    for _, movie, _, _ in ratings:
        expected[families[movie]] += 1
    for spec in raw.schema.scenarios:
        family = spec.table.removeprefix("ratings_")
        table = raw.tables[spec.table]
        assert table.height == expected[family]
        assert {families[m] for m in table["movie_id"].to_list()} <= {family}
    assert raw.pre_dropped == {"no_genre_family": expected[None]}
    assert _total_exposures(raw) + sum(raw.pre_dropped.values()) == len(ratings)
    assert raw.tables["ratings"].height == len(ratings)


def test_tiny_tables_have_exactly_the_schema_columns_and_no_nulls(tiny: Path):
    raw = movielens.load_source(str(tiny), None, None, seed=0)
    for spec in raw.schema.scenarios:
        table = raw.tables[spec.table]
        assert table.columns == scenario_columns(raw.schema, spec)
        assert table.null_count().sum_horizontal().item() == 0
    for seq in [*raw.schema.history, *raw.schema.realtime]:
        assert set(sequence_columns(raw.schema, seq)) <= set(raw.tables[seq.table].columns)
    assert raw.tables["ratings"].null_count().sum_horizontal().item() == 0


def test_tiny_tables_pass_the_data_layer_checks(tiny: Path):
    validate_raw(movielens.load_source(str(tiny), None, None, seed=0))  # dtypes, id ranges, labels


def test_tiny_unknown_release_date_and_odd_zip_get_their_own_buckets(tiny: Path):
    raw = movielens.load_source(str(tiny), None, None, seed=0)
    rows = pl.concat([raw.tables[t].select("movie_id", "decade") for t in ("ratings_drama", "ratings_family")])
    assert set(rows.filter(pl.col("movie_id") == 1)["decade"].to_list()) <= {0}
    assert set(rows.filter(pl.col("movie_id") != 1)["decade"].to_list()) <= set(range(1, 9))
    zips = raw.tables["ratings_drama"]["zip_region"].unique().to_list()
    assert set(zips) <= {0, 2, 11}  # '', '12345' -> 1 + 1, 'T8H1N' -> 11


def test_users_limit_keeps_first_ids(tiny: Path):
    raw = movielens.load_source(str(tiny), None, users=5, seed=0)
    kept = {u for s in raw.schema.scenarios for u in raw.tables[s.table]["user_id"].to_list()}
    assert kept <= set(range(1, 6))
    n = sum(1 for u, *_ in _read_ratings(tiny) if u <= 5)
    assert _total_exposures(raw) + sum(raw.pre_dropped.values()) == n
    assert raw.info["users_requested"] == 5 and raw.info["ratings_kept"] == n


def test_schema_with_fewer_scenarios_counts_the_rest(tiny: Path):
    schema = packaged_schema("movielens").restrict(["thrill", "drama"])
    raw = movielens.load_source(str(tiny), schema, None, seed=0)
    assert set(raw.tables) == {"ratings_thrill", "ratings_drama", "ratings"}
    assert raw.pre_dropped["family_not_in_schema:family"] > 0
    assert _total_exposures(raw) + sum(raw.pre_dropped.values()) == len(_read_ratings(tiny))


def _schema_dict() -> dict:
    return packaged_schema("movielens").model_dump(mode="json")


def test_schema_naming_an_unknown_table_is_an_error(tiny: Path):
    d = _schema_dict()
    d["scenarios"][0]["table"] = "ratings_comedy"
    with pytest.raises(SchemaError, match="ratings_comedy"):
        movielens.load_source(str(tiny), schema_from_dict(d), None, seed=0)


def test_schema_asking_for_a_column_the_source_lacks_names_it(tiny: Path):
    d = _schema_dict()
    d["scenarios"][1]["item_features"].append({"kind": "numeric", "name": "box_office"})
    with pytest.raises(SourceFileError, match="box_office"):
        movielens.load_source(str(tiny), schema_from_dict(d), None, seed=0)


def test_missing_file_is_named(tiny: Path):
    (tiny / "u.user").unlink()
    with pytest.raises(FileNotFoundError, match="u.user"):
        movielens.load_source(str(tiny), None, None, seed=0)


def test_missing_folder_lists_where_it_looked(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="u.data"):
        movielens.load_source(str(tmp_path / "nowhere"), None, None, seed=0)


def _edit_line(path: Path, line: int, new: str, encoding: str = "utf8") -> None:
    lines = path.read_text(encoding=encoding).splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ("1\t2\tfour\t880000000", r"u\.data: column 'rating' line 3: expected an integer, got 'four'"),
        ("1\t2\t7\t880000000", r"u\.data: column 'rating' line 3: expected a rating in 1\.\.5"),
        ("1\t999\t3\t880000000", r"u\.data: column 'movie_id' line 3: expected a movie id listed in u\.item"),
        ("1\t\t3\t880000000", r"u\.data: column 'movie_id' line 3: empty value"),
    ],
)
def test_bad_rating_rows_name_file_column_and_line(tiny: Path, bad_line: str, pattern: str):
    _edit_line(tiny / "u.data", 3, bad_line)
    with pytest.raises(SourceFileError, match=pattern):
        movielens.load_source(str(tiny), None, None, seed=0)


def test_wrong_number_of_fields_is_named(tiny: Path):
    (tiny / "u.data").write_text("1\t2\t3\n4\t5\t6\n")
    with pytest.raises(SourceFileError, match=r"u\.data: expected 4 .*user_id.*found 3"):
        movielens.load_source(str(tiny), None, None, seed=0)


def test_unknown_occupation_is_named(tiny: Path):
    _edit_line(tiny / "u.user", 2, "2|30|F|astronaut|12345")
    with pytest.raises(SourceFileError, match=r"u\.user: column 'occupation' line 2: 'astronaut'"):
        movielens.load_source(str(tiny), None, None, seed=0)


def test_genre_order_is_checked(tiny: Path):
    _edit_line(tiny / "u.genre", 2, "Adventure|1")
    with pytest.raises(SourceFileError, match=r"u\.genre"):
        movielens.load_source(str(tiny), None, None, seed=0)


def test_bad_release_date_is_named(tiny: Path):
    path = tiny / "u.item"
    fields = path.read_text(encoding="latin-1").splitlines()[3].split("|")
    fields[2] = "sometime in 1995"
    _edit_line(path, 4, "|".join(fields), encoding="latin-1")
    with pytest.raises(SourceFileError, match=r"u\.item: column 'release_date' line 4"):
        movielens.load_source(str(tiny), None, None, seed=0)


# --------------------------------------------------------------------------------------------
# The real data set (skipped when absent)
# --------------------------------------------------------------------------------------------


def test_real_counts_add_up(real, real_dir: Path):
    assert _total_exposures(real) + sum(real.pre_dropped.values()) == len(_read_ratings(real_dir)) == 100_000
    assert real.info["users"] == 943
    assert real.tables["ratings"].height == 100_000


def test_real_assignment_follows_rule(real, real_dir: Path):
    families = _read_families(real_dir)
    expected = defaultdict(int)
    for _, movie, _, _ in _read_ratings(real_dir):
        expected[families[movie]] += 1
    for spec in real.schema.scenarios:
        family = spec.table.removeprefix("ratings_")
        table = real.tables[spec.table]
        assert table.height == expected[family]
        assert {families[m] for m in table["movie_id"].unique().to_list()} == {family}
    assert real.pre_dropped == {"no_genre_family": expected[None]}


def test_real_labels_follow_ratings(real, real_dir: Path):
    truth = pl.DataFrame(_read_ratings(real_dir), schema=["user_id", "movie_id", "rating", "ts"], orient="row")
    for spec in real.schema.scenarios:
        joined = real.tables[spec.table].join(truth, on=["user_id", "movie_id", "ts"], how="left")
        assert joined["rating"].null_count() == 0
        assert (joined["like"] == (joined["rating"] >= 4)).all()
        assert (joined["love"] == (joined["rating"] == 5)).all()


def test_real_prior_features_use_only_strictly_earlier_ratings(real, real_dir: Path):
    ratings = _read_ratings(real_dir)
    families = _read_families(real_dir)
    table = real.tables["ratings_thrill"]
    for user in table["user_id"].unique().sort().head(4).to_list():
        mine = [r for r in ratings if r[0] == user]
        rows = table.filter(pl.col("user_id") == user)
        for movie, ts, prior_count, family_mean in rows.select(
            "movie_id", "ts", "user_prior_count", "user_family_prior_mean"
        ).iter_rows():
            earlier = [r for r in mine if r[3] < ts]
            same_family = [r[2] for r in earlier if families[r[1]] == "thrill"]
            assert prior_count == len(earlier)
            assert family_mean == pytest.approx((sum(same_family) + 3.5 * 2) / (len(same_family) + 2))
    for movie, ts, count in table.head(50).select("movie_id", "ts", "movie_prior_count").iter_rows():
        assert count == sum(1 for r in ratings if r[1] == movie and r[3] < ts)


def test_real_tables_have_schema_columns(real):
    for spec in real.schema.scenarios:
        assert real.tables[spec.table].columns == scenario_columns(real.schema, spec)
        assert real.tables[spec.table].null_count().sum_horizontal().item() == 0


def test_real_tables_pass_the_data_layer_checks(real):
    validate_raw(real)


def test_real_users_limit(real_dir: Path):
    raw = movielens.load_source(str(real_dir), None, users=50, seed=0)
    assert raw.info["users"] == 50
    n = sum(1 for u, *_ in _read_ratings(real_dir) if u <= 50)
    assert _total_exposures(raw) + sum(raw.pre_dropped.values()) == n
