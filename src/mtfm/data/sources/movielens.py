"""MovieLens-100K as a multi-scenario, multi-task world (a real-data check for MTFM).

The data set is read in place (its licence forbids redistribution: nothing of it is ever copied
into this repository). Default location: ``../shared/data/movielens-100k`` relative to the
repository (or the current directory), or the environment variable ``MTFM_MOVIELENS_PATH``,
or an explicit ``path``; the files may sit in that folder or in its ``raw/`` sub-folder.
Files read: ``u.data`` (ratings), ``u.item`` (movies, genre flags), ``u.user`` (demographics),
``u.genre`` (the order of the genre flags, checked), ``u.occupation`` (occupation ids).

Modelling choices (MovieLens has no scenarios, exposures or negatives; these make it one):

* Exposure = rating: a rating means the user was shown the movie. Time = the rating's unix
  timestamp (seconds).
* Scenarios = genre families (:data:`FAMILY_RULES`). A movie belongs to exactly one family:
  the rules are tried in order and the first one matching any of the movie's genre flags wins.
  Kids' films (Animation, Children's) are "family" even when also Action/Adventure; then any
  action-like genre makes "thrill"; then Drama/Romance/Documentary "drama"; then
  Comedy/Musical "family". On ML-100K: thrill 53,258, drama 28,521, family 18,211 ratings; the
  10 ratings of the two movies flagged only "unknown" are counted in
  ``pre_dropped["no_genre_family"]``.
* Tasks: ``ctr`` = [like] with like = rating >= 4 (CTR-like); ``ctcvr`` = [like, love] with
  love = rating == 5 (CTCVR-like: love implies like).
* Features differ per scenario (alignment-free; the packaged ``movielens.yaml`` chooses the
  subsets). Everything the source produces, per exposure:

  - user: ``age_bucket`` (0: <18, 1: 18-24, 2: 25-34, 3: 35-44, 4: 45-49, 5: 50-55, 6: 56+),
    ``gender`` (M/F), ``occupation_id`` (line of u.occupation, 1-based), ``zip_region``
    (first zip character: digit d -> d + 1, non-digit -> 11, empty -> 0);
  - item: ``movie_id``, ``genres`` (list of u.genre indices), ``year_bucket`` (release year:
    0 unknown, 1 <1950, 2 1950s, 3 1960s, 4 1970s, 5 1980s, 6 1990-93, 7..10 one per year
    1994..1997, 11 >= 1998), ``decade`` (0 unknown, 1 <1930, 2 1930s ... 8 >= 1990),
    ``movie_age_years`` (rating year - release year, 0 when the release date is unknown),
    ``movie_prior_count`` and ``movie_prior_like_rate`` (earlier ratings of this movie);
  - cross (user x item): ``user_prior_count``, ``user_prior_like_rate``,
    ``user_family_prior_count``, ``user_family_prior_mean`` (mean earlier rating in this
    family, shrunk to 3.5 with weight 2), ``user_family_prior_like_rate``.

  Every "prior" feature counts only ratings with a strictly earlier timestamp (ratings in the
  same second do not see each other), so no label leaks into a feature. Rates are
  Laplace-smoothed: (likes + 1) / (count + 2).
* Behaviour table ``ratings`` (every rating, including the no-family ones): ``movie_id``,
  ``family_id`` (0 none, 1 thrill, 2 drama, 3 family), ``rating``, ``year_bucket``. The schema
  reads history H and real-time R from it; the model's dynamic mask hides R-tokens at or after
  an exposure's timestamp.
* Window 1 day; split by fractions of the days with exposures: the last 20% test, the 10%
  before valid. ML-100K is front-loaded (most users rate on their first days), so the last 10%
  of days holds only ~7.6k ratings of ~140 users; 20% gives ~19k test ratings of ~280 users
  (enough positives for GAUC in the smallest scenario) and still leaves ~72% for training.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import polars.selectors as cs

from mtfm.config import DataSchema, SchemaError
from mtfm.data.raw import RawTables
from mtfm.data.sources.tabular import (
    SourceFileError,
    find_data_dir,
    packaged_schema,
    read_table,
    require_file,
    scenario_columns,
    select_columns,
    sequence_tables,
    strictly_earlier_totals,
)

ENV_VAR = "MTFM_MOVIELENS_PATH"
DEFAULT_RELATIVE = "../shared/data/movielens-100k"
BEHAVIOUR_TABLE = "ratings"
SCENARIO_TABLE_PREFIX = "ratings_"
BEHAVIOUR_COLUMNS = ("movie_id", "family_id", "rating", "year_bucket")

# Genre flag order of u.item, as listed in u.genre (checked at load time).
GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip

# Scenario assignment: tried in order; the first rule matching any of a movie's genres wins.
FAMILY_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("family", frozenset({"Animation", "Children's"})),
    ("thrill", frozenset({"Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime",
                          "Horror", "Mystery", "Film-Noir", "Fantasy"})),
    ("drama", frozenset({"Drama", "Romance", "Documentary"})),
    ("family", frozenset({"Comedy", "Musical"})),
)  # fmt: skip
FAMILIES: tuple[str, ...] = ("thrill", "drama", "family")  # family_id = position + 1; 0 = none

AGE_EDGES = (18, 25, 35, 45, 50, 56)
YEAR_EDGES = (1950, 1960, 1970, 1980, 1990, 1994, 1995, 1996, 1997, 1998)
DECADE_EDGES = (1930, 1940, 1950, 1960, 1970, 1980, 1990)
PRIOR_MEAN_RATING, PRIOR_WEIGHT = 3.5, 2.0
LIKE_THRESHOLD, LOVE_RATING = 4, 5


def family_of(genres: set[str]) -> str | None:
    """The scenario of a movie with these genre names (None: no rule matches)."""
    for family, members in FAMILY_RULES:
        if genres & members:
            return family
    return None


def locate(path: str | None) -> Path:
    """The folder holding ``u.data`` (explicit path, env var, or the repository default)."""
    return find_data_dir(
        path, env_var=ENV_VAR, default_relative=DEFAULT_RELATIVE, marker_glob="u.data", what="movielens"
    )


def load_source(path: str | None, schema: DataSchema | None, users: int | None, seed: int) -> RawTables:
    """Read MovieLens-100K into one exposure table per genre family plus the ``ratings`` table.

    ``users``: keep only the first N user ids. ``seed`` is unused (the data is read, not
    sampled) and recorded in ``info``.
    """
    schema = schema if schema is not None else packaged_schema("movielens")
    _check_schema(schema)
    if users is not None and users <= 0:
        raise ValueError(f"movielens: users must be a positive number, got {users}")
    folder = locate(path)
    frame, kept_users, read_ratings = _rated_frame(folder, users)

    tables, origins, pre_dropped = _split_tables(frame, schema, origin=str(folder / "u.data"))
    info: dict[str, object] = {
        "source": "movielens-100k",
        "path": str(folder),
        "seed": seed,
        "users_requested": users,
        "users": kept_users,
        "ratings_read": read_ratings,
        "ratings_kept": frame.height,
        "scenario_rule": " > ".join(f"{fam}:{'|'.join(sorted(g))}" for fam, g in FAMILY_RULES),
        "exposures_per_scenario": {s.name: tables[s.table].height for s in schema.scenarios},
    }
    return RawTables(schema=schema, tables=tables, origins=origins, pre_dropped=pre_dropped, info=info)


def _split_tables(
    frame: pl.DataFrame, schema: DataSchema, origin: str
) -> tuple[dict[str, pl.DataFrame], dict[str, str], dict[str, int]]:
    """One exposure table per scenario (its family's ratings, its columns), the ``ratings``
    behaviour table, and the counts of ratings no scenario takes."""
    renamed = frame.rename({"user_id": schema.user_column, "ts": schema.time.column})
    exposures = renamed.filter(pl.col("family").is_not_null())
    pre_dropped = {"no_genre_family": int(frame["family"].null_count())}
    tables: dict[str, pl.DataFrame] = {}
    origins: dict[str, str] = {}
    for spec in schema.scenarios:
        family = spec.table.removeprefix(SCENARIO_TABLE_PREFIX)
        rows = exposures.filter(pl.col("family") == family)
        wanted = scenario_columns(schema, spec)
        tables[spec.table] = select_columns(rows, wanted, table=spec.table, source="movielens", origin=origin)
        origins[spec.table] = f"{origin} (genre family {family})"
    for family in FAMILIES:
        if f"{SCENARIO_TABLE_PREFIX}{family}" not in tables:
            pre_dropped[f"family_not_in_schema:{family}"] = int((exposures["family"] == family).sum())
    behaviour = renamed.select(schema.user_column, schema.time.column, *BEHAVIOUR_COLUMNS)
    seq_tables, seq_origins = sequence_tables(schema, behaviour, source="movielens", origin=origin)
    return tables | seq_tables, origins | seq_origins, pre_dropped


def _check_schema(schema: DataSchema) -> None:
    """Scenario tables must name a genre family; sequence tables must be ``ratings``; time in s."""
    valid = [f"{SCENARIO_TABLE_PREFIX}{f}" for f in FAMILIES]
    for spec in schema.scenarios:
        if spec.table not in valid:
            raise SchemaError(
                f"movielens: scenario '{spec.name}' has table '{spec.table}'; this source provides {valid}"
            )
    tables = [s.table for s in schema.scenarios]
    if len(set(tables)) != len(tables):
        raise SchemaError(f"movielens: two scenarios read the same table: {tables}")
    for seq in [*schema.history, *schema.realtime]:
        if seq.table != BEHAVIOUR_TABLE:
            raise SchemaError(
                f"movielens: sequence '{seq.name}' has table '{seq.table}'; this source provides '{BEHAVIOUR_TABLE}'"
            )
    if schema.time.unit != "s":
        raise SchemaError(f"movielens: timestamps are in seconds; the schema says time.unit={schema.time.unit!r}")


# --------------------------------------------------------------------------------------------
# Reading and feature building
# --------------------------------------------------------------------------------------------


def _rated_frame(folder: Path, users: int | None) -> tuple[pl.DataFrame, int, int]:
    """Every kept rating joined with its movie and user, with labels and past-only features."""
    _check_genre_file(folder / "u.genre")
    movies = _movies(folder / "u.item")
    people = _users(folder / "u.user", folder / "u.occupation")
    ratings = _ratings(folder / "u.data", movies, people)
    read = ratings.height
    if users is not None:
        keep = people["user_id"].sort().head(users)
        ratings = ratings.filter(pl.col("user_id").is_in(keep.implode()))
    kept_users = int(ratings["user_id"].n_unique())
    frame = (
        ratings.join(movies, on="movie_id", how="left", maintain_order="left")
        .join(people, on="user_id", how="left", maintain_order="left")
        .with_columns(
            (pl.col("rating") >= LIKE_THRESHOLD).cast(pl.Int64).alias("like"),
            (pl.col("rating") == LOVE_RATING).cast(pl.Int64).alias("love"),
            _movie_age().alias("movie_age_years"),
        )
        .sort("user_id", "ts", "movie_id")
    )
    return _with_prior_features(frame), kept_users, read


def _check_genre_file(path: Path) -> None:
    """u.item's flag order is defined by u.genre; refuse a file whose order differs from GENRES."""
    genre = read_table(path, {"name": "str", "index": "int"}, separator="|", header=["name", "index"])
    found = tuple(genre.sort("index")["name"].to_list())
    if found != GENRES or genre["index"].to_list() != list(range(len(GENRES))):
        raise SourceFileError(f"{path}: expected the genres {list(GENRES)} at indices 0..{len(GENRES) - 1}, found {found}")


def _movies(path: Path) -> pl.DataFrame:
    header = ["movie_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES]
    kinds = {"movie_id": "int", "title": "str", "release_date": "str", **{g: "int" for g in GENRES}}
    raw = read_table(
        path, kinds, separator="|", header=header, encoding="latin1", quote_char=None,
        nullable=["title", "release_date"],
    )  # fmt: skip
    _require_unique(raw, "movie_id", path)
    for g in GENRES:
        bad = ~raw[g].is_in([0, 1])
        if bad.any():
            row = int(bad.arg_max())
            raise SourceFileError(f"{path}: column '{g}' line {row + 1}: genre flag must be 0 or 1, got {raw[g][row]}")
    released = raw["release_date"].str.to_date("%d-%b-%Y", strict=False)
    bad = released.is_null() & raw["release_date"].is_not_null()
    if bad.any():
        row = int(bad.arg_max())
        raise SourceFileError(
            f"{path}: column 'release_date' line {row + 1}: expected a date like 01-Jan-1995, "
            f"got {raw['release_date'][row]!r}"
        )
    year = released.dt.year().cast(pl.Int64)
    genre_lists = raw.select(
        pl.concat_list([pl.when(pl.col(g) == 1).then(pl.lit(i, pl.Int64)) for i, g in enumerate(GENRES)])
        .list.drop_nulls()
        .alias("genres")
    )["genres"]
    family_s = raw.select(_family_expr().alias("family"))["family"]
    return pl.DataFrame(
        {
            "movie_id": raw["movie_id"],
            "genres": genre_lists,
            "family": family_s,
            "family_id": family_s.replace_strict({f: i + 1 for i, f in enumerate(FAMILIES)}, default=0,
                                                 return_dtype=pl.Int64),
            "release_year": year,
            "year_bucket": _bucket(year, YEAR_EDGES),
            "decade": _bucket(year, DECADE_EDGES),
        }
    )  # fmt: skip


def _family_expr() -> pl.Expr:
    """FAMILY_RULES as one vectorised expression over the genre flag columns (first rule wins)."""
    expr = pl.lit(None, dtype=pl.String)
    for family, members in reversed(FAMILY_RULES):
        expr = pl.when(pl.any_horizontal([pl.col(g) == 1 for g in GENRES if g in members])).then(pl.lit(family)).otherwise(expr)
    return expr


def _bucket(values: pl.Series, edges: tuple[int, ...]) -> pl.Series:
    """1 + number of edges <= value; 0 for a missing value."""
    counted = pl.select(pl.sum_horizontal([(values >= e).cast(pl.Int64) for e in edges]) + 1).to_series()
    return pl.select(pl.when(values.is_null()).then(0).otherwise(counted)).to_series().cast(pl.Int64)


def _users(path: Path, occupation_path: Path) -> pl.DataFrame:
    header = ["user_id", "age", "gender", "occupation", "zip_code"]
    raw = read_table(
        path, {c: ("int" if c in ("user_id", "age") else "str") for c in header}, separator="|", header=header,
        nullable=["zip_code"],
    )  # fmt: skip
    _require_unique(raw, "user_id", path)
    occupations = read_table(require_file(occupation_path, "movielens occupation"), {"occupation": "str"},
                             separator="|", header=["occupation"])["occupation"].to_list()  # fmt: skip
    unknown = ~raw["occupation"].is_in(occupations)
    if unknown.any():
        row = int(unknown.arg_max())
        raise SourceFileError(
            f"{path}: column 'occupation' line {row + 1}: {raw['occupation'][row]!r} is not listed in {occupation_path}"
        )
    first = raw["zip_code"].str.slice(0, 1)
    return raw.select(
        "user_id",
        "gender",
        (_bucket(raw["age"], AGE_EDGES) - 1).alias("age_bucket"),
        raw["occupation"].replace_strict({o: i + 1 for i, o in enumerate(occupations)}, return_dtype=pl.Int64)
        .alias("occupation_id"),
        pl.select(
            pl.when(first.is_null()).then(0)
            .when(first.str.contains(r"^[0-9]$")).then(first.cast(pl.Int64, strict=False) + 1)
            .otherwise(11)
        ).to_series().cast(pl.Int64).alias("zip_region"),
    )  # fmt: skip


def _ratings(path: Path, movies: pl.DataFrame, people: pl.DataFrame) -> pl.DataFrame:
    header = ["user_id", "movie_id", "rating", "ts"]
    ratings = read_table(path, {c: "int" for c in header}, separator="\t", header=header)
    checks = [
        ("rating", ~ratings["rating"].is_between(1, 5), "a rating in 1..5"),
        ("ts", ratings["ts"] < 0, "a non-negative unix timestamp"),
        ("user_id", ~ratings["user_id"].is_in(people["user_id"].implode()), "a user id listed in u.user"),
        ("movie_id", ~ratings["movie_id"].is_in(movies["movie_id"].implode()), "a movie id listed in u.item"),
    ]
    for column, bad, expected in checks:
        if bad.any():
            row = int(bad.arg_max())
            raise SourceFileError(
                f"{path}: column '{column}' line {row + 1}: expected {expected}, got {ratings[column][row]} "
                f"({int(bad.sum())} bad row(s) in total)"
            )
    return ratings


def _require_unique(df: pl.DataFrame, column: str, path: Path) -> None:
    dup = df[column].is_duplicated()
    if dup.any():
        row = int(dup.arg_max())
        raise SourceFileError(f"{path}: column '{column}' line {row + 1}: id {df[column][row]} appears more than once")


def _movie_age() -> pl.Expr:
    rated_year = pl.from_epoch("ts", time_unit="s").dt.year().cast(pl.Int64)
    return (rated_year - pl.col("release_year")).clip(lower_bound=0).fill_null(0).cast(pl.Float64)


def _with_prior_features(frame: pl.DataFrame) -> pl.DataFrame:
    """Past-only user, user x family and movie statistics (see the module docstring)."""
    sums = {"likes": pl.col("like"), "rating_sum": pl.col("rating")}
    frame = strictly_earlier_totals(frame, ["user_id"], "ts", sums, prefix="_u_")
    frame = strictly_earlier_totals(frame, ["user_id", "family_id"], "ts", sums, prefix="_uf_")
    frame = strictly_earlier_totals(frame, ["movie_id"], "ts", sums, prefix="_m_")
    return frame.with_columns(
        pl.col("_u_count").cast(pl.Float64).alias("user_prior_count"),
        _laplace("_u_likes", "_u_count").alias("user_prior_like_rate"),
        pl.col("_uf_count").cast(pl.Float64).alias("user_family_prior_count"),
        ((pl.col("_uf_rating_sum") + PRIOR_MEAN_RATING * PRIOR_WEIGHT) / (pl.col("_uf_count") + PRIOR_WEIGHT))
        .alias("user_family_prior_mean"),
        _laplace("_uf_likes", "_uf_count").alias("user_family_prior_like_rate"),
        pl.col("_m_count").cast(pl.Float64).alias("movie_prior_count"),
        _laplace("_m_likes", "_m_count").alias("movie_prior_like_rate"),
    ).drop(cs.starts_with("_"))


def _laplace(hits: str, count: str) -> pl.Expr:
    return (pl.col(hits) + 1.0) / (pl.col(count) + 2.0)
