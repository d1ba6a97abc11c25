"""KuaiRand-Pure (Kuaishou short-video logs, CC BY-SA 4.0) as a multi-scenario world.

Reads the official layout (``KuaiRand-Pure/data/``): every ``log_standard_*.csv`` (the
standard-policy logs; the separate random-exposure log is not read), one
``user_features_*.csv`` and one ``video_features_basic_*.csv``. ``path`` may be that folder or
its parent (``data/`` or ``raw/`` sub-folder); the default is ``../shared/data/kuairand-pure``
relative to the repository or the environment variable ``MTFM_KUAIRAND_PATH``. The shared copy
on the development machines holds only the two side tables: write logs in the official schema
next to them with :func:`write_sample_logs` (``python -m mtfm.data.sources.kuairand OUT``).

Official log columns (KuaiRand README, all int64): :data:`LOG_COLUMNS`. Checked when read:
every column present, integer values, no nulls in ids / ``time_ms`` / ``tab`` / the binary
feedback columns, feedback in {0, 1}, ``time_ms`` and ``tab`` not negative. A log row whose
``user_id`` or ``video_id`` is missing from its side table is an error naming the log file,
column and line (the Pure logs only hold candidate-pool videos and known users, so an unknown
id means mismatched files; dropping such rows would hide that).

Modelling choices:

* Scenario = ``tab`` (the app surface the exposure happened on). The mapping lives in the
  schema: a scenario's ``table`` is named ``tab_<k>`` or ``tab_<k1>_<k2>...`` and holds the
  log rows whose ``tab`` is one of those values. The packaged ``kuairand.yaml`` maps tabs 1,
  0 and 4; rows of any other tab are counted in ``pre_dropped["unmapped_tab"]`` (still
  behaviour: they feed the click history). ``info["tab_counts"]`` lists every tab's rows, to
  help choose a mapping.
* Exposure = log row. Time = ``time_ms`` (unit ms); window 1 day, windows aligned on the unix
  epoch (08:00 Beijing time). Split: the last 10% of days test, the 10% before valid.
* Tasks (the schema chooses): ``ctr`` = [is_click], ``long_view`` = [long_view],
  ``like`` = [is_like].
* Item features from the video table: ``video_id``, ``author_id`` (hashed by the schema),
  ``video_type``, ``upload_type`` (null -> "UNKNOWN"), ``tag_ids`` (list of tag + 1; [0] when
  the video has no tag), ``first_tag_id``, ``music_type_id``; from the log row:
  ``duration_bucket`` (``duration_ms``, else the video table's ``video_duration``, cut at 7 s,
  18 s (the valid-play and long-view thresholds), 30 s, 60 s, 120 s, 300 s -> 1..7; 0 unknown).
* User features from the user table: the ``*_range`` and ``user_active_degree`` strings as
  they are (null -> "UNKNOWN"); counts (``follow_user_num`` ...; missing -> 0); every integer
  code ``c`` (``is_live_streamer``, ``is_video_author``, ``is_lowactive_period``,
  ``onehot_feat0..17``) as ``c_id`` = value + 1, with 0 for a missing value: the data set
  writes missing as -124 (e.g. 21,127 users' ``is_live_streamer``) or leaves the field empty
  (e.g. ``onehot_feat12..17`` of 714 users); both become their own category 0.
* Cross / context features, past only (rows of the same user with a strictly earlier
  ``time_ms``, all tabs): ``user_prior_exposures``, ``user_prior_ctr``,
  ``user_prior_long_view_rate``, ``user_tab_prior_ctr`` (same tab), ``user_author_prior_clicks``
  (clicks on the same author); rates are Laplace-smoothed (hits + 1) / (n + 2). ``hour``:
  hour of day in Beijing time (known before the exposure).
* Behaviour table ``clicks``: every clicked log row of the kept users, all tabs, with
  ``video_id``, ``tab``, ``author_id``, ``first_tag_id``, ``duration_bucket``, ``long_view``,
  ``is_like``; history H and real-time R read it.
"""

from __future__ import annotations

import argparse
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from mtfm.config import DataSchema, SchemaError
from mtfm.data.raw import RawTables
from mtfm.data.sources.tabular import (
    ColumnKind,
    SourceFileError,
    check_binary,
    check_known_ids,
    find_data_dir,
    packaged_schema,
    read_table,
    scenario_columns,
    select_columns,
    sequence_tables,
    strictly_earlier_totals,
)

ENV_VAR = "MTFM_KUAIRAND_PATH"
DEFAULT_RELATIVE = "../shared/data/kuairand-pure"
LOG_GLOB, USER_GLOB, VIDEO_GLOB = "log_standard_*.csv", "user_features_*.csv", "video_features_basic_*.csv"
BEHAVIOUR_TABLE = "clicks"
TAB_TABLE = re.compile(r"^tab_(\d+(?:_\d+)*)$")

LOG_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)  # fmt: skip
BINARY_LOG_COLUMNS: tuple[str, ...] = (
    "is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
    "is_profile_enter", "is_rand",
)  # fmt: skip
NULLABLE_LOG_COLUMNS = ("date", "hourmin", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time")

USER_STRINGS = ("user_active_degree", "follow_user_num_range", "fans_user_num_range",
                "friend_user_num_range", "register_days_range")  # fmt: skip
USER_COUNTS = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
USER_CODES = ("is_lowactive_period", "is_live_streamer", "is_video_author", *[f"onehot_feat{i}" for i in range(18)])
USER_COLUMNS: tuple[str, ...] = (
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
    "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
    *[f"onehot_feat{i}" for i in range(18)],
)  # fmt: skip
VIDEO_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status", "video_duration",
    "server_width", "server_height", "music_id", "music_type", "tag",
)  # fmt: skip
MISSING_CODE = -124  # the data set's own marker for a missing value
DURATION_EDGES_MS = (7_000, 18_000, 30_000, 60_000, 120_000, 300_000)
BEIJING = timezone(timedelta(hours=8))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def locate(path: str | None) -> Path:
    """The folder holding the side tables and logs (explicit path, env var, or the default)."""
    return find_data_dir(
        path, env_var=ENV_VAR, default_relative=DEFAULT_RELATIVE, marker_glob=USER_GLOB, what="kuairand"
    )


def load_source(path: str | None, schema: DataSchema | None, users: int | None, seed: int) -> RawTables:
    """Read KuaiRand-Pure into one exposure table per mapped tab group plus ``clicks``.

    ``users``: keep only the first N distinct user ids of the logs. ``seed`` is unused (the
    data is read, not sampled) and recorded in ``info``.
    """
    schema = schema if schema is not None else packaged_schema("kuairand")
    tab_map = tab_mapping(schema)
    if users is not None and users <= 0:
        raise ValueError(f"kuairand: users must be a positive number, got {users}")
    folder = locate(path)
    log_paths = sorted(folder.glob(LOG_GLOB))
    if not log_paths:
        raise FileNotFoundError(
            f"{folder}: no {LOG_GLOB} (the KuaiRand interaction logs); write logs in the official "
            f"schema with `python -m mtfm.data.sources.kuairand OUT_DIR` or point --path at KuaiRand-Pure/data"
        )
    user_path, video_path = _single(folder, USER_GLOB), _single(folder, VIDEO_GLOB)
    people, videos = read_users(user_path), read_videos(video_path)
    log = _read_logs(log_paths, people, videos, user_path, video_path)
    read_rows = log.height
    if users is not None:
        keep = log["user_id"].unique().sort().head(users)
        log = log.filter(pl.col("user_id").is_in(keep.implode()))
    frame = _exposure_frame(log, people, videos, keep=_schema_columns(schema)).rename(
        {"user_id": schema.user_column, "time_ms": schema.time.column}
    )
    tables, origins = _split_tables(frame, schema, origin=", ".join(str(p) for p in log_paths))
    tab_counts = frame.group_by("tab").len().sort("tab")
    info: dict[str, object] = {
        "source": "kuairand",
        "path": str(folder),
        "log_files": [p.name for p in log_paths],
        "seed": seed,
        "users_requested": users,
        "users": int(frame[schema.user_column].n_unique()),
        "log_rows_read": read_rows,
        "log_rows_kept": frame.height,
        "tab_map": {str(k): v for k, v in sorted(tab_map.items())},
        "tab_counts": {str(t): int(n) for t, n in tab_counts.iter_rows()},
        "exposures_per_scenario": {s.name: tables[s.table].height for s in schema.scenarios},
    }
    unmapped = int((~frame["tab"].is_in(sorted(tab_map))).sum())
    return RawTables(schema, tables, origins, pre_dropped={"unmapped_tab": unmapped}, info=info)


def _split_tables(frame: pl.DataFrame, schema: DataSchema, origin: str) -> tuple[dict[str, pl.DataFrame], dict[str, str]]:
    """One exposure table per scenario (its tabs' rows, its columns, plus ``tab`` for audit)
    and the ``clicks`` behaviour table (clicked rows of every tab)."""
    tables: dict[str, pl.DataFrame] = {}
    origins: dict[str, str] = {}
    for spec in schema.scenarios:
        tabs = sorted(_tabs_of(spec.table))
        wanted = list(dict.fromkeys([*scenario_columns(schema, spec), "tab"]))
        rows = frame.filter(pl.col("tab").is_in(tabs))
        tables[spec.table] = select_columns(rows, wanted, table=spec.table, source="kuairand", origin=origin)
        origins[spec.table] = f"{origin} (tab in {tabs})"
    behaviour = frame.filter(pl.col("is_click") == 1)
    seq_tables, seq_origins = sequence_tables(schema, behaviour, source="kuairand", origin=f"{origin} (is_click = 1)")
    return tables | seq_tables, origins | seq_origins


def tab_mapping(schema: DataSchema) -> dict[int, str]:
    """tab value -> scenario name, from the scenario table names ``tab_<k>[_<k2>...]``.

    Also checks the rest of the schema against what this source provides (sequence tables,
    time unit), so a wrong schema fails before any file is read.
    """
    mapping: dict[int, str] = {}
    for spec in schema.scenarios:
        for tab in _tabs_of(spec.table, scenario=spec.name):
            if tab in mapping:
                raise SchemaError(f"kuairand: tab {tab} is mapped to both scenarios '{mapping[tab]}' and '{spec.name}'")
            mapping[tab] = spec.name
    for seq in [*schema.history, *schema.realtime]:
        if seq.table != BEHAVIOUR_TABLE:
            raise SchemaError(
                f"kuairand: sequence '{seq.name}' has table '{seq.table}'; this source provides '{BEHAVIOUR_TABLE}'"
            )
    if schema.time.unit != "ms":
        raise SchemaError(f"kuairand: time_ms is in milliseconds; the schema says time.unit={schema.time.unit!r}")
    return mapping


def _tabs_of(table: str, scenario: str = "?") -> set[int]:
    match = TAB_TABLE.match(table)
    if match is None:
        raise SchemaError(
            f"kuairand: scenario '{scenario}' has table '{table}'; name it tab_<k> or tab_<k1>_<k2>... "
            "after the log's tab values it holds (e.g. tab_1)"
        )
    return {int(t) for t in match.group(1).split("_")}


def _single(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected exactly one {pattern}, found {[p.name for p in found]}")
    return found[0]


def read_users(path: Path) -> pl.DataFrame:
    """The user table with codes as ``<code>_id`` (value + 1; 0 = missing: null or -124)."""
    kinds: dict[str, ColumnKind] = {c: ("str" if c in USER_STRINGS else "int") for c in USER_COLUMNS}
    raw = read_table(path, kinds, nullable=[c for c in USER_COLUMNS if c != "user_id"])
    _require_unique(raw, "user_id", path)
    return raw.select(
        "user_id",
        *[pl.col(c).fill_null("UNKNOWN") for c in USER_STRINGS],
        *[pl.when(pl.col(c) < 0).then(0).otherwise(pl.col(c)).fill_null(0).cast(pl.Float64).alias(c)
          for c in USER_COUNTS],
        *[_code_id(c) for c in USER_CODES],
    )  # fmt: skip


def _code_id(column: str) -> pl.Expr:
    value = pl.col(column)
    missing = value.is_null() | (value == MISSING_CODE) | (value < 0)
    return pl.when(missing).then(0).otherwise(value + 1).cast(pl.Int64).alias(f"{column}_id")


def read_videos(path: Path) -> pl.DataFrame:
    """The basic video table with the derived item features (see the module docstring)."""
    kinds: dict[str, ColumnKind] = {
        "video_id": "int", "author_id": "int", "video_type": "str", "upload_type": "str",
        "video_duration": "float", "music_type": "int", "tag": "str",
    }  # fmt: skip
    raw = read_table(path, kinds, nullable=[c for c in kinds if c != "video_id"])
    _require_unique(raw, "video_id", path)
    tags = raw["tag"].str.split(",").list.eval(pl.element().str.strip_chars().cast(pl.Int64, strict=False))
    bad = tags.list.eval(pl.element().is_null() | (pl.element() < 0)).list.any() & raw["tag"].is_not_null()
    if bad.any():
        row = int(bad.arg_max())
        raise SourceFileError(
            f"{path}: column 'tag' line {row + 2}: expected comma-separated non-negative integers, got {raw['tag'][row]!r}"
        )
    shifted = tags.list.eval(pl.element() + 1)
    tag_ids = pl.select(pl.when(tags.is_null()).then(pl.lit([0], dtype=pl.List(pl.Int64))).otherwise(shifted)).to_series()
    return pl.DataFrame(
        {
            "video_id": raw["video_id"],
            "author_id": raw["author_id"].fill_null(-1),
            "video_type": raw["video_type"].fill_null("UNKNOWN"),
            "upload_type": raw["upload_type"].fill_null("UNKNOWN"),
            "video_duration": raw["video_duration"],
            "music_type_id": raw.select(_code_id("music_type"))["music_type_id"],
            "tag_ids": tag_ids,
            "first_tag_id": tag_ids.list.first(),
        }
    )


def _require_unique(df: pl.DataFrame, column: str, path: Path) -> None:
    dup = df[column].is_duplicated()
    if dup.any():
        row = int(dup.arg_max())
        raise SourceFileError(f"{path}: column '{column}' line {row + 2}: id {df[column][row]} appears more than once")


def _read_logs(
    paths: list[Path], people: pl.DataFrame, videos: pl.DataFrame, user_path: Path, video_path: Path
) -> pl.DataFrame:
    """Every log file, checked, concatenated (file order, then line order)."""
    frames = []
    for path in paths:
        log = read_table(path, {c: "int" for c in LOG_COLUMNS}, nullable=NULLABLE_LOG_COLUMNS)
        check_binary(log, BINARY_LOG_COLUMNS, path, first_line=2)
        for column in ("time_ms", "tab"):
            bad = log[column] < 0
            if bad.any():
                row = int(bad.arg_max())
                raise SourceFileError(f"{path}: column '{column}' line {row + 2}: must not be negative, got {log[column][row]}")
        check_known_ids(log, "user_id", people["user_id"], path, 2, user_path)
        check_known_ids(log, "video_id", videos["video_id"], path, 2, video_path)
        frames.append(log)
    return pl.concat(frames, how="vertical")


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _schema_columns(schema: DataSchema) -> set[str]:
    """Every column any table of ``schema`` names (the frame carries only these, plus what the
    source itself needs), so that a real-size log is not joined with unused side columns."""
    cols = {c for spec in schema.scenarios for c in scenario_columns(schema, spec)}
    return cols | {f.name for seq in [*schema.history, *schema.realtime] for f in seq.features}


def _exposure_frame(log: pl.DataFrame, people: pl.DataFrame, videos: pl.DataFrame, keep: set[str]) -> pl.DataFrame:
    """Log rows joined with user and video features, plus past-only cross features.

    Keeps the log's own columns, the derived ones, and the side-table columns in ``keep``.
    """
    own = {"video_duration", "author_id", "first_tag_id"}  # needed below whatever the schema says
    frame = (
        log.sort("user_id", "time_ms", "video_id", maintain_order=True)  # narrow: sort before the joins
        .join(videos.select(c for c in videos.columns if c == "video_id" or c in keep | own),
              on="video_id", how="left", maintain_order="left")
        .join(people.select(c for c in people.columns if c == "user_id" or c in keep),
              on="user_id", how="left", maintain_order="left")
        .with_columns(
            _duration_bucket().alias("duration_bucket"),
            ((pl.col("time_ms") // 3_600_000 + 8) % 24).alias("hour"),
        )
    )
    sums = {"clicks": pl.col("is_click"), "long_views": pl.col("long_view")}
    frame = strictly_earlier_totals(frame, ["user_id"], "time_ms", sums, prefix="_u_")
    frame = strictly_earlier_totals(frame, ["user_id", "tab"], "time_ms", sums, prefix="_ut_")
    frame = strictly_earlier_totals(frame, ["user_id", "author_id"], "time_ms", sums, prefix="_ua_")
    return frame.with_columns(
        pl.col("_u_count").cast(pl.Float64).alias("user_prior_exposures"),
        _laplace("_u_clicks", "_u_count").alias("user_prior_ctr"),
        _laplace("_u_long_views", "_u_count").alias("user_prior_long_view_rate"),
        _laplace("_ut_clicks", "_ut_count").alias("user_tab_prior_ctr"),
        pl.col("_ua_clicks").cast(pl.Float64).alias("user_author_prior_clicks"),
    ).drop([c for c in frame.columns if c.startswith("_")])


def _duration_bucket() -> pl.Expr:
    duration = pl.col("duration_ms").cast(pl.Float64).fill_null(pl.col("video_duration"))
    bucket = pl.sum_horizontal([(duration >= e).cast(pl.Int64) for e in DURATION_EDGES_MS]) + 1
    return pl.when(duration.is_null() | (duration <= 0)).then(0).otherwise(bucket).cast(pl.Int64)


def _laplace(hits: str, count: str) -> pl.Expr:
    return (pl.col(hits) + 1.0) / (pl.col(count) + 2.0)


# --------------------------------------------------------------------------------------------
# Writing files in the official layout (tests, and users without the logs)
# --------------------------------------------------------------------------------------------

LOG_START = datetime(2022, 4, 8, tzinfo=BEIJING)  # the Pure logs span 2022-04-08 .. 2022-05-08
LOG_SPLIT = datetime(2022, 4, 22, tzinfo=BEIJING)  # first day of the second official file
LOG_END = datetime(2022, 5, 9, tzinfo=BEIJING)
LOG_FILES = ("log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv")
USER_FILE, VIDEO_FILE = "user_features_pure.csv", "video_features_basic_pure.csv"
# Made-up tab shares for generated logs (the real distribution is unknown here): three large
# tabs and a tail of small ones, so that generated data exercises the unmapped-tab path.
SAMPLE_TAB_SHARES = {1: 0.40, 0: 0.25, 4: 0.15, 2: 0.06, 6: 0.04, 3: 0.03, 5: 0.02, 7: 0.01, 8: 0.01,
                     9: 0.01, 10: 0.005, 11: 0.005, 12: 0.005, 13: 0.0025, 14: 0.0025}  # fmt: skip


def write_sample_logs(
    out_dir: str | Path,
    users_csv: str | Path | None = None,
    videos_csv: str | Path | None = None,
    n_rows: int = 20_000,
    seed: int = 0,
) -> Path:
    """Write a complete KuaiRand-Pure ``data/`` folder whose logs are generated.

    The two log files have exactly the official columns and order (:data:`LOG_COLUMNS`), and
    are split by date like the official ones; users and videos come from ``users_csv`` /
    ``videos_csv`` (default: the side tables found by :func:`locate`), which are copied next
    to the logs under their official names so that ``out_dir`` can be passed as ``--path``.
    Labels follow the README's definitions: ``is_click`` (valid play) and ``long_view`` are
    derived from a generated play time and the video's duration; users prefer a few tags, so
    a model can learn something. Deterministic for ``seed``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if users_csv is None or videos_csv is None:
        folder = locate(None)
        users_csv = users_csv or _single(folder, USER_GLOB)
        videos_csv = videos_csv or _single(folder, VIDEO_GLOB)
    users_csv, videos_csv = Path(users_csv), Path(videos_csv)
    user_ids = read_users(users_csv)["user_id"].to_numpy()
    videos = read_videos(videos_csv)
    log = _generate_log(user_ids, videos, n_rows, np.random.default_rng(seed))
    split_ms = int(LOG_SPLIT.timestamp() * 1000)
    log.filter(pl.col("time_ms") < split_ms).write_csv(out / LOG_FILES[0])
    log.filter(pl.col("time_ms") >= split_ms).write_csv(out / LOG_FILES[1])
    for src, name in ((users_csv, USER_FILE), (videos_csv, VIDEO_FILE)):
        if src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    return out


def _generate_log(user_ids: np.ndarray, videos: pl.DataFrame, n_rows: int, rng: np.random.Generator) -> pl.DataFrame:
    if n_rows <= 0:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    active = rng.choice(user_ids, size=min(len(user_ids), max(1, n_rows // 40)), replace=False)
    activity = rng.lognormal(0.0, 1.0, len(active))
    user_idx = rng.choice(len(active), size=n_rows, p=activity / activity.sum())
    popularity = 1.0 / (rng.permutation(videos.height) + 10.0) ** 0.8
    video_idx = rng.choice(videos.height, size=n_rows, p=popularity / popularity.sum())
    start, end = int(LOG_START.timestamp() * 1000), int(LOG_END.timestamp() * 1000)
    time_ms = rng.integers(start, end, n_rows)
    tabs = np.array(list(SAMPLE_TAB_SHARES))
    shares = np.array(list(SAMPLE_TAB_SHARES.values()))
    tab = rng.choice(tabs, size=n_rows, p=shares / shares.sum())

    known = videos["video_duration"].to_numpy()
    duration = np.where(np.isnan(known), rng.lognormal(10.8, 0.8, videos.height), known)[video_idx]
    duration = np.maximum(duration, 1000.0).astype(np.int64)
    first_tag = videos["first_tag_id"].to_numpy()[video_idx]
    liked_tags = rng.integers(1, 70, size=(len(active), 3))
    match = (liked_tags[user_idx] == first_tag[:, None]).any(axis=1)
    bias = rng.normal(0.0, 0.5, len(active))[user_idx]
    engaged = rng.random(n_rows) < 1.0 / (1.0 + np.exp(-(-0.6 + 1.5 * match + 0.3 * (tab == 1) + bias)))
    fraction = np.where(engaged, rng.beta(4.0, 2.0, n_rows) * 1.3, rng.beta(1.0, 25.0, n_rows))
    play = (duration * fraction).astype(np.int64)
    is_click = ((duration <= 7_000) & (play >= duration)) | ((duration > 7_000) & (play > 7_000))
    long_view = ((duration <= 18_000) & (play >= duration)) | ((duration > 18_000) & (play >= 18_000))

    def bern(p: np.ndarray | float) -> np.ndarray:
        return (rng.random(n_rows) < p).astype(np.int64)

    profile_enter = bern(0.03 * is_click)
    comment = bern(0.01 * long_view)
    local = pl.Series(time_ms).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").dt.convert_time_zone("Asia/Shanghai")
    return pl.DataFrame(
        {
            "user_id": active[user_idx],
            "video_id": videos["video_id"].to_numpy()[video_idx],
            "date": local.dt.strftime("%Y%m%d").cast(pl.Int64),
            "hourmin": (local.dt.hour().cast(pl.Int64) * 100 + local.dt.minute().cast(pl.Int64)),
            "time_ms": time_ms,
            "is_click": is_click.astype(np.int64),
            "is_like": bern(0.06 * long_view + 0.002),
            "is_follow": bern(0.004 * long_view),
            "is_comment": comment,
            "is_forward": bern(0.004 * long_view),
            "is_hate": bern(0.002 * ~is_click),
            "long_view": long_view.astype(np.int64),
            "play_time_ms": play,
            "duration_ms": duration,
            "profile_stay_time": profile_enter * rng.integers(1_000, 60_000, n_rows),
            "comment_stay_time": np.maximum(comment, bern(0.03 * long_view)) * rng.integers(1_000, 90_000, n_rows),
            "is_profile_enter": profile_enter,
            "is_rand": np.zeros(n_rows, dtype=np.int64),
            "tab": tab.astype(np.int64),
        }
    ).select(LOG_COLUMNS).sort("user_id", "time_ms")


def write_sample_side_tables(out_dir: str | Path, n_users: int = 300, n_videos: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Generated ``user_features_pure.csv`` and ``video_features_basic_pure.csv`` (official columns).

    For tests and demos that must not depend on the real tables. Value ranges follow the
    KuaiRand README; missing values appear the way the real files write them (-124 in
    ``is_live_streamer``, empty fields in some ``onehot_feat*``, ``music_type``,
    ``video_duration``, ``tag``). Deterministic for ``seed``.
    """
    if n_users <= 0 or n_videos <= 0:
        raise ValueError(f"n_users and n_videos must be positive, got {n_users}, {n_videos}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _sample_users(n_users, rng).write_csv(out / USER_FILE)
    _sample_videos(n_videos, rng).write_csv(out / VIDEO_FILE)
    return out / USER_FILE, out / VIDEO_FILE


# Ranges of the encrypted one-hot codes (README: onehot_featK takes 0..max).
ONEHOT_MAX = (1, 6, 49, 1470, 14, 33, 2, 117, 453, 6, 4, 4, 1, 1, 1, 1, 1, 1)


def _sample_users(n: int, rng: np.random.Generator) -> pl.DataFrame:
    def pick(values: list[str]) -> np.ndarray:
        return rng.choice(np.array(values), n)

    def with_gaps(values: np.ndarray, share: float) -> pl.Series:
        return pl.Series(values).scatter(np.flatnonzero(rng.random(n) < share), None)

    columns: dict[str, object] = {
        "user_id": np.arange(n),
        "user_active_degree": pick(["full_active", "high_active", "middle_active", "2_14_day_new", "low_active", "UNKNOWN"]),
        "is_lowactive_period": np.zeros(n, dtype=np.int64),
        "is_live_streamer": np.where(rng.random(n) < 0.75, MISSING_CODE, 1),
        "is_video_author": rng.integers(0, 2, n),
        "follow_user_num": rng.integers(0, 600, n),
        "follow_user_num_range": pick(["0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+"]),
        "fans_user_num": rng.integers(0, 2000, n),
        "fans_user_num_range": pick(["0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)"]),
        "friend_user_num": rng.integers(0, 300, n),
        "friend_user_num_range": pick(["0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+"]),
        "register_days": rng.integers(15, 3000, n),
        "register_days_range": pick(["15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+"]),
    }
    for i, top in enumerate(ONEHOT_MAX):
        codes = rng.integers(0, top + 1, n)
        columns[f"onehot_feat{i}"] = with_gaps(codes, 0.03) if i == 4 or i >= 12 else codes
    return pl.DataFrame(columns).select(USER_COLUMNS)


def _sample_videos(n: int, rng: np.random.Generator) -> pl.DataFrame:
    def with_gaps(values: np.ndarray | list, share: float) -> pl.Series:
        return pl.Series(values).scatter(np.flatnonzero(rng.random(n) < share), None)

    tags = [",".join(str(t) for t in rng.choice(np.arange(1, 69), rng.integers(1, 4), replace=False)) for _ in range(n)]
    return pl.DataFrame(
        {
            "video_id": np.arange(n),
            "author_id": rng.integers(0, 8_839_735, n),
            "video_type": rng.choice(np.array(["NORMAL", "AD"]), n, p=[0.99, 0.01]),
            "upload_dt": rng.choice(np.array(["2022-04-09", "2022-04-10", "2022-04-11"]), n),
            "upload_type": rng.choice(np.array(["LongImport", "Web", "ShortImport", "Kmovie", "UNKNOWN"]), n),
            "visible_status": np.zeros(n),
            "video_duration": with_gaps(rng.lognormal(11.2, 0.8, n).round(), 0.03),
            "server_width": np.full(n, 720.0),
            "server_height": np.full(n, 1280.0),
            "music_id": rng.integers(10**8, 10**10, n),
            "music_type": with_gaps(rng.choice(np.array([4.0, 7.0, 8.0, 9.0, 11.0]), n), 0.03),
            "tag": with_gaps(tags, 0.02),
        }
    ).select(VIDEO_COLUMNS)


def main(argv: list[str] | None = None) -> int:
    """``python -m mtfm.data.sources.kuairand OUT``: write a KuaiRand-Pure folder with generated logs."""
    parser = argparse.ArgumentParser(
        prog="python -m mtfm.data.sources.kuairand",
        description="Write log_standard_*.csv files in the official KuaiRand-Pure schema next to the "
        "user and video tables, so that `mtfm prepare --source kuairand --path OUT` can run without "
        "the real logs.",
    )
    parser.add_argument("out", help="folder to write (created if needed)")
    parser.add_argument("--rows", type=int, default=20_000, help="log rows to generate (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users-csv", help="user table (default: the shared KuaiRand-Pure copy)")
    parser.add_argument("--videos-csv", help="video table (default: the shared KuaiRand-Pure copy)")
    parser.add_argument("--generate-side-tables", action="store_true",
                        help="also generate the user and video tables (no real files needed)")  # fmt: skip
    args = parser.parse_args(argv)
    users_csv, videos_csv = args.users_csv, args.videos_csv
    if args.generate_side_tables:
        users_csv, videos_csv = write_sample_side_tables(args.out, seed=args.seed)
    out = write_sample_logs(args.out, users_csv, videos_csv, n_rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} log rows in the KuaiRand-Pure layout to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
