"""Small hand-built worlds for the data-layer tests, and a plain-Python reference aggregator.

Why: the tests must not depend on another source being finished, and the vectorised
aggregation needs an obviously-correct reference to be compared with (one loop per sample,
written from the definitions in DESIGN.md, nothing shared with mtfm.data.aggregate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from mtfm.config import DataSchema, schema_from_dict
from mtfm.data.raw import RawTables

WINDOW = 100
# Every table carries its row number as an unnormalised numeric feature, so a test can tell
# exactly which raw rows ended up where after encoding.
RID = {"kind": "numeric", "name": "rid", "normalization": "none"}


def tiny_schema_dict(**overrides: object) -> dict:
    """Two scenarios with different feature sets, two history types, one real-time type."""
    schema = {
        "user_column": "user_id",
        "time": {"column": "ts", "unit": "s"},
        "window": WINDOW,
        "split": {"valid_fraction": 0.25, "test_fraction": 0.25},
        "scenarios": [
            {
                "name": "A",
                "table": "exp_a",
                "user_features": [{"kind": "categorical", "name": "level", "num_embeddings": 4}],
                "cross_features": [{"kind": "numeric", "name": "ctr_hist", "normalization": "standard"}],
                "item_features": [
                    {"kind": "categorical", "name": "item", "hash_buckets": 97},
                    {"kind": "categorical", "name": "color", "vocabulary": ["red", "green", "blue"]},
                    {"kind": "multi_categorical", "name": "tags", "num_embeddings": 8, "max_len": 3},
                    {"kind": "numeric", "name": "price", "normalization": "log1p"},
                    RID,
                ],
                "tasks": [
                    {"name": "ctr", "labels": ["click"], "oracle_column": "p_click"},
                    {"name": "ctcvr", "labels": ["click", "buy"], "allow_missing": True},
                ],
            },
            {
                "name": "B",
                "table": "exp_b",
                "item_features": [
                    {"kind": "categorical", "name": "item", "num_embeddings": 50},
                    {"kind": "numeric", "name": "score", "normalization": "minmax", "clip": [0.0, 0.9]},
                    RID,
                ],
                "tasks": [{"name": "ctr", "labels": ["click"]}],
            },
        ],
        "history": [
            {"name": "orders", "table": "orders", "max_len": 3,
             "features": [{"kind": "categorical", "name": "item", "hash_buckets": 31},
                          {"kind": "numeric", "name": "amount", "normalization": "standard"}, RID]},
            {"name": "clicks", "table": "clicks", "max_len": 4,
             "features": [{"kind": "categorical", "name": "item", "hash_buckets": 31}, RID]},
        ],
        "realtime": [
            {"name": "recent", "table": "clicks", "max_len": 2,
             "features": [{"kind": "categorical", "name": "item", "hash_buckets": 31}, RID]},
        ],
    }
    schema.update(overrides)
    return schema


def tiny_schema(**overrides: object) -> DataSchema:
    return schema_from_dict(tiny_schema_dict(**overrides), "tiny")


@dataclass
class WorldSize:
    users: int = 12
    exposures_a: int = 120
    exposures_b: int = 60
    orders: int = 50
    clicks: int = 90
    windows: int = 6


def tiny_world(seed: int = 0, size: WorldSize | None = None, schema: DataSchema | None = None) -> RawTables:
    """Random tables over ``size.windows`` windows; timestamps collide often on purpose."""
    size = size or WorldSize()
    rng = np.random.default_rng(seed)
    span = size.windows * WINDOW
    t0 = 10 * WINDOW

    def users(n: int) -> np.ndarray:
        return rng.integers(0, size.users, n) * 7 + 3  # sparse, non-zero-based ids

    def stamps(n: int) -> np.ndarray:
        return t0 + rng.integers(0, span // 3, n) * 3  # multiples of 3: many equal timestamps

    n = size.exposures_a
    click = rng.integers(0, 2, n)
    buy = np.where(click == 1, rng.integers(0, 2, n), -1)
    exp_a = pl.DataFrame({
        "user_id": users(n), "ts": stamps(n),
        "level": rng.integers(0, 4, n), "ctr_hist": rng.normal(0.1, 0.05, n),
        "item": rng.integers(1000, 1100, n), "color": rng.choice(["red", "green", "blue", "pink"], n),
        "tags": [list(rng.integers(0, 8, rng.integers(0, 5))) for _ in range(n)],
        "price": rng.uniform(0, 50, n), "click": click,
        "buy": pl.Series(buy).replace(-1, None), "p_click": rng.uniform(0, 1, n),
    }).with_columns(pl.col("tags").cast(pl.List(pl.Int64)))
    m = size.exposures_b
    exp_b = pl.DataFrame({
        "user_id": users(m), "ts": stamps(m), "item": rng.integers(0, 50, m),
        "score": rng.uniform(0, 1, m), "click": rng.integers(0, 2, m),
    })
    k = size.orders
    orders = pl.DataFrame({
        "user_id": np.r_[users(k - 1), 999_999], "ts": rng.integers(0, t0 + span, k),
        "item": rng.integers(0, 500, k), "amount": rng.uniform(5, 80, k),
    })
    c = size.clicks
    clicks = pl.DataFrame({"user_id": users(c), "ts": rng.integers(0, t0 + span, c), "item": rng.integers(0, 500, c)})
    schema = schema or tiny_schema()
    tables = {"exp_a": exp_a, "exp_b": exp_b, "orders": orders, "clicks": clicks}
    tables = {t: df.with_columns(pl.int_range(len(df), dtype=pl.Int64).alias("rid")) for t, df in tables.items()}
    return RawTables(schema, tables, {t: f"memory:{t}" for t in tables}, info={"seed": seed})


# --------------------------------------------------------------------------------------------
# Reference aggregation: one loop per sample, straight from the definitions
# --------------------------------------------------------------------------------------------


def reference_samples(raw: RawTables) -> dict[tuple[int, int], dict]:
    """(user, window_start) -> {"T": {scenario: [row dicts]}, "H": {type: [row dicts]}, "R": {...}}.

    Row dicts are the raw rows (original values, not encoded) so the test can compare what
    was selected and in which order. No drop policy (use it on tables without duplicates and
    without time limits).
    """
    s = raw.schema
    w = s.window
    out: dict[tuple[int, int], dict] = {}
    for spec in s.scenarios:
        df = raw.tables[spec.table].with_row_index("_row")
        for row in df.iter_rows(named=True):
            key = (row["user_id"], row["ts"] // w * w)
            out.setdefault(key, {"T": {x.name: [] for x in s.scenarios}})["T"][spec.name].append(row)
    for sample in out.values():
        for rows in sample["T"].values():
            rows.sort(key=lambda r: (r["ts"], r["_row"]))
    for (user, start), sample in out.items():
        for kind, specs in (("H", s.history), ("R", s.realtime)):
            sample[kind] = {}
            for spec in specs:
                df = raw.tables[spec.table].with_row_index("_row")
                rows = [r for r in df.iter_rows(named=True) if r["user_id"] == user]
                rows.sort(key=lambda r: (r["ts"], r["_row"]))
                before = [r for r in rows if r["ts"] < start]
                kept = before[-spec.max_len:] if before else []
                if kind == "R":  # plus the window's own actions (the first max_in_window when capped)
                    inside = [r for r in rows if start <= r["ts"] < start + w]
                    kept += inside if spec.max_in_window is None else inside[:spec.max_in_window]
                sample[kind][spec.name] = kept
    return out
