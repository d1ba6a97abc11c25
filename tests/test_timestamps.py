"""Timestamps as datetimes, ISO-8601 text and in s/ms/us/ns prepare to the same store (issue 11, item 1)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from data_world import tiny_schema_dict, tiny_world
from input_helpers import store_contents
from mtfm.config import schema_from_dict
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.raw import RawTables
from mtfm.data.store import read_manifest
from mtfm.data.timestamps import PER_SECOND, to_unit
from mtfm.data.validate import DataError
from test_store_loader import _flat

T0 = 1_700_000_000  # 2023-11-14, a multiple of the tiny window (100 s)
OFFSETS = [dt.timedelta(hours=h, minutes=m) for h, m in ((0, 0), (2, 0), (-5, 0), (5, 30), (-9, -30))]


def _world(unit: str = "s") -> RawTables:
    """The tiny world moved to 2023 with integer timestamps in ``unit`` (window 100 s)."""
    raw = tiny_world(0)
    k = PER_SECOND[unit]
    schema = schema_from_dict(tiny_schema_dict(time={"column": "ts", "unit": unit}, window=100 * k), "t")
    tables = {n: df.with_columns((pl.col("ts") + T0) * k) for n, df in raw.tables.items()}
    return RawTables(schema, tables, raw.origins, info=dict(raw.info))


def _iso_text(ts_seconds: pl.Series) -> pl.Series:
    """Each timestamp as ISO-8601 text in a different offset (and forms: Z, space, +0530)."""
    out = []
    for i, t in enumerate(ts_seconds.to_list()):
        off = OFFSETS[i % len(OFFSETS)]
        local = dt.datetime.fromtimestamp(t, tz=dt.timezone(off))
        text = local.isoformat()
        if i % 7 == 3:
            text = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        elif i % 7 == 5:
            text = local.strftime("%Y-%m-%dT%H:%M:%S%z")
        elif i % 7 == 6 and off == dt.timedelta(0):
            text = local.strftime("%Y-%m-%dT%H:%M:%S")  # no offset: UTC
        out.append(text)
    return pl.Series("ts", out)


def _converted(raw: RawTables, convert) -> RawTables:
    return RawTables(raw.schema, {n: df.with_columns(convert(df["ts"])) for n, df in raw.tables.items()},
                     raw.origins, info=dict(raw.info))


def _store(raw: RawTables, out):
    prepare(raw, out)
    return store_contents(out)


@pytest.mark.parametrize("form", ["datetime_utc_us", "datetime_naive_ms", "datetime_kolkata_ns", "iso_text", "date"])
def test_datetime_and_iso_timestamps_give_the_integer_seconds_store(form, tmp_path) -> None:
    raw = _world("s")
    if form == "date":  # whole days: compare with integer seconds floored to the day
        raw = _converted(raw, lambda s: (s // 86_400) * 86_400)
        expected = _store(raw, tmp_path / "int")
        other = _converted(raw, lambda s: pl.from_epoch(s, "s").dt.date())
    else:
        expected = _store(raw, tmp_path / "int")
        convert = {
            "datetime_utc_us": lambda s: pl.from_epoch(s, "s").cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
            "datetime_naive_ms": lambda s: pl.from_epoch(s, "s").cast(pl.Datetime("ms")),
            "datetime_kolkata_ns": lambda s: pl.from_epoch(s, "s").cast(pl.Datetime("ns"))
            .dt.replace_time_zone("UTC").dt.convert_time_zone("Asia/Kolkata"),
            "iso_text": _iso_text,
        }[form]
        other = _converted(raw, convert)
        assert other.tables["exp_a"]["ts"].dtype != pl.Int64
    assert _store(other, tmp_path / form) == expected


@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
def test_finer_units_from_integers_and_datetimes_give_one_store(unit, tmp_path) -> None:
    raw = _world(unit)
    expected = _store(raw, tmp_path / "int")
    manifest = read_manifest(tmp_path / "int")
    assert manifest.time_unit == unit and manifest.window == 100 * PER_SECOND[unit]
    as_datetime = _converted(raw, lambda s: pl.from_epoch(s, unit).dt.replace_time_zone("UTC")
                             .dt.convert_time_zone("Europe/Paris"))
    assert _store(as_datetime, tmp_path / "dt") == expected
    # the same world in seconds gives the same samples (counts and splits), only the clock differs
    seconds = read_manifest(_store_dir(_world("s"), tmp_path / "s"))
    assert seconds.samples == manifest.samples
    assert {k: v.samples for k, v in seconds.splits.items()} == {k: v.samples for k, v in manifest.splits.items()}


def _store_dir(raw: RawTables, out):
    prepare(raw, out)
    return out


def test_finer_precision_is_floored_to_the_unit() -> None:
    s = pl.Series("ts", ["2024-01-01T00:00:00.999+00:00", "2023-12-31T23:59:59.5-00:00"])
    assert to_unit(s, "s", "x").to_list() == [1_704_067_200, 1_704_067_199]
    assert to_unit(s, "ms", "x").to_list() == [1_704_067_200_999, 1_704_067_199_500]


def test_unparseable_text_names_row_and_value(tmp_path) -> None:
    raw = _converted(_world("s"), _iso_text)
    ts = raw.tables["clicks"]["ts"].to_list()
    ts[4] = "yesterday"
    bad = RawTables(raw.schema, {**raw.tables, "clicks": raw.tables["clicks"].with_columns(pl.Series("ts", ts))},
                    raw.origins)
    with pytest.raises(DataError, match=r"memory:clicks: column 'ts', row 4: got 'yesterday'; expected a timestamp"):
        prepare(bad, tmp_path)


def test_null_datetime_is_named_by_the_validation(tmp_path) -> None:
    raw = _converted(_world("s"), lambda s: pl.from_epoch(s, "s"))
    ts = raw.tables["exp_b"]["ts"].to_list()
    ts[6] = None
    bad = RawTables(raw.schema, {**raw.tables, "exp_b": raw.tables["exp_b"].with_columns(pl.Series("ts", ts))},
                    raw.origins)
    with pytest.raises(DataError, match=r"memory:exp_b: column 'ts', row 6: got None"):
        prepare(bad, tmp_path)


def test_build_request_accepts_datetime_candidates_and_behaviour(tmp_path) -> None:
    raw = _world("s")
    manifest = prepare(raw, tmp_path / "p")
    exp = raw.tables["exp_b"]
    user = int(exp["user_id"][0])
    t = int(exp["ts"][0])
    cand = exp.filter((pl.col("user_id") == user) & (pl.col("ts") // 100 == t // 100)).drop("click")
    plain = build_request(raw, manifest, user, "B", cand, t)
    as_dt = _converted(raw, lambda s: pl.from_epoch(s, "s").dt.replace_time_zone("UTC"))
    cand_dt = cand.with_columns(pl.from_epoch("ts", "s").dt.convert_time_zone("America/New_York"))
    other = build_request(as_dt, manifest, user, "B", cand_dt, t)
    assert _flat(other) == _flat(plain)
    assert len(plain.scenarios["B"].timestamps) == len(cand)


def test_a_unit_mismatch_is_named(tmp_path) -> None:
    in_ms = _world("ms")
    as_seconds_schema = RawTables(_world("s").schema, in_ms.tables, in_ms.origins)
    with pytest.raises(DataError, match=r"memory:exp_a: column 'ts': the timestamps look like milliseconds "
                                        r"\(median \d+ is 2023-11-14 in 'ms'\), but the schema says time.unit 's'"):
        prepare(as_seconds_schema, tmp_path)
    small_clock = tiny_world(0)  # t = 0 .. 1600: no calendar date in any unit, so no complaint
    prepare(small_clock, tmp_path / "ok")


def test_schema_time_bounds_may_be_dates_and_iso_times(tmp_path) -> None:
    text = "\n".join([
        "time: {column: ts, unit: ms, min: 2023-11-14T00:00:00+01:00, max: '2023-11-16'}",
        "split: {valid_start: 2023-11-15, test_start: '2023-11-15T12:00:00Z'}",
    ])
    import yaml

    data = {**tiny_schema_dict(), **yaml.safe_load(text)}
    schema = schema_from_dict(data, "s.yaml")
    assert schema.time.min == 1_699_916_400_000 and schema.time.max == 1_700_092_800_000
    assert schema.split.valid_start == 1_700_006_400_000 and schema.split.test_start == 1_700_049_600_000
    assert schema_from_dict(schema.model_dump(mode="json")) == schema
    with pytest.raises(Exception, match="time.min"):
        schema_from_dict({**tiny_schema_dict(), "time": {"column": "ts", "min": "last tuesday"}}, "s.yaml")
