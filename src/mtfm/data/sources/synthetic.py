"""A synthetic multi-scenario food-delivery world with known ground truth.

Why it exists: the paper's data (Meituan HP / PHF / SQS) is private, so this source builds a
world with the same *shape* (paper section 3.1 and Table 1) where every effect a model should
learn is planted on purpose and every exposure carries its true probabilities (oracle columns),
so the ceiling of any model is known:

* three default scenarios: restaurant feed ``HP``, food feed ``PHF``, coupon-package feed
  ``SQS`` with exposure volume about 8 : 7 : 1, distinct item types and distinct feature
  schemas; more scenarios get a generated generic schema (:func:`synthetic_schema`);
* users have latent interests shared by all scenarios (cuisine preference, price
  sensitivity, deal seeking, click propensity), so behaviour in one scenario predicts another;
  the small SQS scenario gains most from the others' data;
* one shared behaviour log (``clicks`` and ``orders`` tables, all scenarios plus organic
  search activity) with a pre-period before the first exposure day, feeding history H and
  real-time R;
* real-time effect: a click on a cuisine in the last ``realtime_window_s`` seconds raises the
  click probability of exposures of that cuisine, so R carries signal and a wrong mask leaks;
* cross features computed only from strictly earlier events;
* labels click and conversion (and, for SQS, coupon redemption within 30 min / 24 h).

Time layout: exposures are shown in *pages* (one request, several items, one timestamp).
Pages of a user are at least ``MIN_PAGE_GAP_S`` seconds apart and a click comes 1..60 s after
its exposure, so every click of a page lands before the user's next page: the real-time state
seen by a page is exactly "all clicks strictly before its timestamp", and the per-page
simulation loop is vectorised over all users of a block.

Scale: users are generated in fixed blocks of ``block_users`` seeded by ``(seed, block)``;
item catalogs depend on the seed only. Output is therefore independent of how blocks are
grouped into chunks, and :func:`write_parquet` streams worlds of any size chunk by chunk.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from mtfm.config import (
    CategoricalFeature,
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    ScenarioSpec,
    SchemaError,
    SequenceSpec,
    SplitSpec,
    TaskSpec,
    TimeSpec,
    load_schema,
)
from mtfm.data.output import WORLD_HEADER_MARK  # prepare --overwrite knows the schema.yaml it wrote by it
from mtfm.data.raw import RawTables
from mtfm.metrics import auc, gauc

DAY = 86_400
START_TS = 1_704_067_200  # 2024-01-01 00:00:00 UTC; a multiple of DAY so windows align with days
DEFAULT_USERS = 20_000
NUM_CUISINES = 12
NUM_PRICE_BUCKETS = 4
NUM_DISTANCE_BUCKETS = 6
NUM_DISH_TYPES = 6
NUM_DISH_TAGS = 10
MAX_DISH_TAGS = 4
NUM_BRANDS = 200
NUM_STYLES = 8  # upper bound of the "style" attribute of generated (generic) scenarios
VALIDITY_DAYS = (1, 3, 7, 30)
CLICK_DELAY_S = (1, 60)  # a click lands 1..60 s after its exposure
ORDER_DELAY_S = (120, 1800)  # an order lands 2..30 min after its click
MIN_PAGE_GAP_S = CLICK_DELAY_S[1] + 1  # so all clicks of a page precede the user's next page
MAX_PAGES_PER_DAY = 40  # per user-day over all scenarios; keeps every page inside its day
ITEM_ID_STRIDE = 1_000_000  # raw item id = scenario index * stride + catalog index
CTR_PRIOR_WEIGHT = 5.0  # pseudo-exposures of the smoothed past-CTR cross feature
CTR_PRIOR = 0.04  # the CTR those pseudo-exposures carry
HISTORY_MAX_LEN = 64
REALTIME_MAX_LEN = 32
SCENARIO_SEARCH = 0  # scenario id of organic (search) behaviour in the behaviour tables

Kind = Literal["restaurant", "dish", "coupon", "generic"]


# --------------------------------------------------------------------------------------------
# Scenarios and configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioDef:
    """Generation parameters of one scenario (not part of the schema, which is data-only).

    ``share`` sets the expected exposure volume relative to the other scenarios; ``p_use``
    is the fraction of users who ever use the scenario; intercepts were tuned so that CTR is
    about 2-6 % and CTCVR about 0.3-1 % per scenario.
    """

    index: int  # 1-based scenario id used in the behaviour tables (0 = organic search)
    name: str
    kind: Kind
    share: float
    page_size: int
    p_use: float
    n_items: int
    click_bias: float
    conv_bias: float

    @property
    def table(self) -> str:
        return f"exposures_{self.name.lower()}"

    @property
    def prefix(self) -> str:
        return self.name.lower()


_DEFAULT_SCENARIOS: tuple[ScenarioDef, ...] = (
    ScenarioDef(1, "HP", "restaurant", 8.0, 4, 0.95, 20_000, -3.50, -2.65),
    ScenarioDef(2, "PHF", "dish", 7.0, 4, 0.85, 40_000, -5.00, -2.35),
    ScenarioDef(3, "SQS", "coupon", 1.0, 2, 0.60, 2_000, -4.80, -3.25),
)


def scenario_defs(num_scenarios: int) -> list[ScenarioDef]:
    """The first three scenarios are HP, PHF, SQS; scenario k >= 4 is a generic ``S<k>``."""
    if num_scenarios < 1:
        raise ValueError(f"num_scenarios must be >= 1, got {num_scenarios}")
    defs = list(_DEFAULT_SCENARIOS[:num_scenarios])
    for k in range(4, num_scenarios + 1):
        defs.append(ScenarioDef(k, f"S{k}", "generic", 3.0, 3, 0.70, 10_000, -4.35, -3.0))
    return defs


def default_shares(num_scenarios: int) -> tuple[float, ...]:
    """The default exposure volume shares (8 : 7 : 1 for HP, PHF, SQS, 3 per generic), normalised."""
    raw = np.array([d.share for d in scenario_defs(num_scenarios)], dtype=np.float64)
    return tuple(float(x) for x in raw / raw.sum())


def _num_styles(index: int) -> int:
    """Cardinality of a generic scenario's ``style`` attribute (differs between scenarios)."""
    return 3 + index % (NUM_STYLES - 2)


class SyntheticConfig(BaseModel):
    """Everything that determines a synthetic world; same config -> identical tables.

    Size: with the defaults a user has about 94 exposures over the 14 days (about 110k users
    give 10M exposures). ``block_users`` is part of the world's identity (it fixes the seeding);
    how blocks are grouped into chunks when writing is not.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(default=DEFAULT_USERS, gt=0)
    seed: int = Field(default=0, ge=0)
    days: int = Field(default=14, ge=3, le=180,
                      description="exposure days; the last test_days are test, the valid_days before them valid")
    valid_days: int = Field(default=1, ge=1, description="exposure days of the valid split (before the test days)")
    test_days: int = Field(default=1, ge=1, description="exposure days of the test split (the last ones)")
    scenario_shares: tuple[float, ...] | None = Field(
        default=None,
        description="exposure volume of each scenario relative to the others, one per scenario; normalised, so they "
        "need not sum to 1 (8,7,1 means 0.5,0.4375,0.0625); None: 8 : 7 : 1 for HP, PHF, SQS and 3 per generic one",
    )
    history_days: int = Field(default=14, ge=1, le=365, description="behaviour-only pre-period before day 0")
    history_max_len: int = Field(
        default=HISTORY_MAX_LEN, ge=1, le=8192,
        description="max_len of each history sequence type (orders, clicks) in the generated schema; with a longer "
        "history_days a user has hundreds of actions, which only a larger cap lets the model see")
    realtime_max_len: int = Field(default=REALTIME_MAX_LEN, ge=1, le=8192,
                                  description="max_len of the real-time sequence (recent_clicks) in the generated schema")
    exposures_per_active_day: float = Field(default=12.0, gt=0, le=150, description="mean over active user-days")
    num_scenarios: int = Field(default=3, ge=1, le=64)
    block_users: int = Field(default=8192, gt=0, description="users per independently seeded block")
    start_ts: int = Field(default=START_TS, description="first exposure day start (seconds, multiple of 86400)")
    realtime_window_s: int = Field(default=1800, gt=0, description="how long a click raises same-cuisine clicks")
    realtime_boost: float = Field(default=1.2, ge=0, description="logit added while a same-cuisine click is recent")
    personalization: float = Field(default=0.5, ge=0, le=1, description="share of exposures picked by user taste")

    @model_validator(mode="after")
    def _aligned_start(self) -> "SyntheticConfig":
        if self.start_ts % DAY != 0:
            raise ValueError(f"start_ts must be a multiple of {DAY} so windows align with days, got {self.start_ts}")
        if self.valid_days + self.test_days >= self.days:
            raise ValueError(f"valid_days (--valid-days {self.valid_days}) + test_days (--test-days {self.test_days}) "
                             f"must be less than days (--days {self.days}): the train split needs at least one day")
        if self.scenario_shares is not None:
            shares = self.scenario_shares
            if len(shares) != self.num_scenarios:
                raise ValueError(f"scenario_shares (--scenario-shares) has {len(shares)} value(s) for "
                                 f"{self.num_scenarios} scenarios (--num-scenarios {self.num_scenarios}): give one "
                                 "per scenario")
        return self

    @field_validator("scenario_shares")
    @classmethod
    def _positive_shares(cls, shares: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if shares is not None and (not shares or not all(math.isfinite(x) and x > 0 for x in shares)):
            raise ValueError(f"must be positive finite numbers, got {list(shares)}")
        return shares  # as given (relative volumes): the generator normalises, and the header's command repeats them

    @property
    def shares(self) -> tuple[float, ...]:
        """Each scenario's share of the exposure volume (normalised; the defaults when not given)."""
        if self.scenario_shares is None:
            return default_shares(self.num_scenarios)
        total = math.fsum(self.scenario_shares)
        return tuple(x / total for x in self.scenario_shares)

    def scenario_defs(self) -> list[ScenarioDef]:
        """The scenarios of this world, with its volume shares."""
        defs = scenario_defs(self.num_scenarios)
        if self.scenario_shares is None:
            return defs
        return [dataclasses.replace(d, share=x) for d, x in zip(defs, self.scenario_shares)]

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.users / self.block_users)

    def schema(self) -> DataSchema:
        return synthetic_schema(self.num_scenarios, self.days, self.start_ts, self.valid_days, self.test_days,
                                self.history_max_len, self.realtime_max_len)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _cat(name: str, n: int, share: str | None = None) -> CategoricalFeature:
    return CategoricalFeature(name=name, num_embeddings=n, share=share)


def _hashed(name: str, buckets: int, share: str | None = None) -> CategoricalFeature:
    return CategoricalFeature(name=name, hash_buckets=buckets, share=share)


def _num(name: str, normalization: str) -> NumericFeature:
    return NumericFeature(name=name, normalization=normalization)


def _tasks(d: ScenarioDef) -> list[TaskSpec]:
    tasks = [
        TaskSpec(name="ctr", labels=["click"], oracle_column="p_ctr"),
        TaskSpec(name="ctcvr", labels=["click", "conversion"], oracle_column="p_ctcvr"),
    ]
    if d.kind == "coupon":
        tasks.append(TaskSpec(name="imd", labels=["click", "conversion", "redeem_30m"], oracle_column="p_imd"))
        tasks.append(TaskSpec(name="write", labels=["click", "conversion", "redeem_24h"], oracle_column="p_write"))
    return tasks


def _scenario_features(d: ScenarioDef) -> tuple[list[Feature], list[Feature]]:
    """(user features, item features) of one scenario; deliberately different per kind.

    Embedding sharing (``share:``): ``cuisine`` is one table for every scenario and sequence,
    ``restaurant_id`` one for HP and PHF (the same restaurants), a generic scenario's ``item_id``
    one for all generic scenarios (global raw ids, hashed alike); every other feature, ``style``
    included (each generic scenario has its own styles), has its own table."""
    p = d.prefix
    if d.kind == "restaurant":
        user = [_cat(f"{p}_member_level", 5), _num(f"{p}_orders_7d", "log1p")]
        item = [
            _hashed("restaurant_id", 20_000, "restaurant_id"), _cuisine(), _cat("price_level", NUM_PRICE_BUCKETS),
            _cat("distance_bucket", NUM_DISTANCE_BUCKETS), _num("rating", "standard"),
            _num("monthly_sales", "log1p"), _num("delivery_minutes", "standard"),
        ]
    elif d.kind == "dish":
        user = [_cat(f"{p}_age_group", 6), _num(f"{p}_days_since_order", "log1p")]
        item = [
            _hashed("dish_id", 50_000), _hashed("restaurant_id", 20_000, "restaurant_id"), _cuisine(),
            _cat("dish_type", NUM_DISH_TYPES), _num("price", "log1p"),
            MultiCategoricalFeature(name="dish_tags", num_embeddings=NUM_DISH_TAGS, max_len=MAX_DISH_TAGS),
        ]
    elif d.kind == "coupon":
        user = [_cat(f"{p}_coupon_user", 2), _cat(f"{p}_price_tier", 3)]
        item = [
            _hashed("package_id", 4_000), _cat("brand", NUM_BRANDS), _cuisine(),
            _num("discount", "standard"), CategoricalFeature(name="validity_days", vocabulary=list(VALIDITY_DAYS)),
            _num("package_price", "log1p"),
        ]
    else:
        user = [_cat(f"{p}_segment", 4)]
        item = [
            _hashed("item_id", 20_000, "generic_item_id"), _cuisine(), _cat("style", _num_styles(d.index)),
            _num("price", "log1p"), _num("score", "standard"),
        ]
    return user, item


def _cuisine() -> CategoricalFeature:
    return _cat("cuisine", NUM_CUISINES, "cuisine")


def _behaviour_features(num_scenarios: int, with_amount: bool) -> list[Feature]:
    """Features of the behaviour sequences; the three sequence types share their tables."""
    feats: list[Feature] = [
        _cat("scenario", num_scenarios + 1, "scenario"), _hashed("item_id", 100_000, "item_id"),
        _cuisine(), _cat("price_bucket", NUM_PRICE_BUCKETS, "price_bucket"),
    ]
    if with_amount:
        feats.append(_num("amount", "log1p"))
    return feats


def synthetic_schema(num_scenarios: int = 3, days: int = 14, start_ts: int = START_TS, valid_days: int = 1,
                     test_days: int = 1, history_max_len: int = HISTORY_MAX_LEN,
                     realtime_max_len: int = REALTIME_MAX_LEN) -> DataSchema:
    """The DataSchema of a synthetic world (the packaged ``synthetic.yaml`` is the default).

    Split: the last ``test_days`` exposure days are test, the ``valid_days`` before them valid,
    the rest train. ``history_max_len`` caps each history type, ``realtime_max_len`` the real-time type.
    """
    scenarios = []
    for d in scenario_defs(num_scenarios):
        user, item = _scenario_features(d)
        cross = [_num(f"{d.prefix}_user_cuisine_ctr", "standard"), _num(f"{d.prefix}_user_cuisine_orders", "log1p")]
        scenarios.append(ScenarioSpec(name=d.name, table=d.table, user_features=user, cross_features=cross,
                                      item_features=item, tasks=_tasks(d)))
    return DataSchema(
        user_column="user_id",
        time=TimeSpec(column="ts", unit="s"),
        window=DAY,
        split=SplitSpec(valid_start=start_ts + (days - test_days - valid_days) * DAY,
                        test_start=start_ts + (days - test_days) * DAY),
        scenarios=scenarios,
        history=[
            SequenceSpec(name="orders", table="orders", features=_behaviour_features(num_scenarios, True),
                         max_len=history_max_len),
            SequenceSpec(name="clicks", table="clicks", features=_behaviour_features(num_scenarios, False),
                         max_len=history_max_len),
        ],
        realtime=[
            SequenceSpec(name="recent_clicks", table="clicks", features=_behaviour_features(num_scenarios, False),
                         max_len=realtime_max_len),
        ],
    )


def schema_yaml(schema: DataSchema, header: str | None = None) -> str:
    """Readable YAML of a schema (unset fields left out); loads back to an equal schema.

    ``header``: the comment block on top (default: the packaged file's; see :func:`world_header`)."""
    body = yaml.safe_dump(schema.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return (_YAML_HEADER if header is None else header) + body




def _number(x: float) -> str:
    text = repr(float(x))  # the shortest text that reads back to the same float
    return text[:-2] if text.endswith(".0") else text


def world_flags(config: SyntheticConfig, split: bool = True) -> str:
    """The world's knobs as command-line flags, each explicit, so the command reproduces the world
    (``--scenario-shares`` only when given: the default shares come from the scenario kinds;
    ``--history-days`` and the sequence caps only when not the defaults, so the command of a world
    made before those flags existed reads as it did; ``split`` False leaves out the split days, for
    a command whose ``--schema`` has its own split)."""
    shares = "" if config.scenario_shares is None else (
        " --scenario-shares " + ",".join(_number(x) for x in config.scenario_shares))
    days = f" --valid-days {config.valid_days} --test-days {config.test_days}" if split else ""
    return (f"--users {config.users} --seed {config.seed} --num-scenarios {config.num_scenarios}{shares} "
            f"--days {config.days}{days}{_behaviour_flags(config)}")


def _behaviour_flags(config: SyntheticConfig) -> str:
    """``--history-days`` / ``--history-max-len`` / ``--realtime-max-len`` where they differ from the defaults."""
    defaults = SyntheticConfig.model_fields
    return "".join(f" {WORLD_FLAGS[k]} {getattr(config, k)}" for k in BEHAVIOUR_KNOBS
                   if getattr(config, k) != defaults[k].default)


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).date().isoformat()


def _split_text(config: SyntheticConfig, schema: DataSchema) -> str:
    """The schema's split in days of the world (or as written, when it is not in days)."""
    split, first, end = schema.split, config.start_ts, config.start_ts + config.days * DAY
    v, t = split.valid_start, split.test_start
    if not all(isinstance(x, int) and (x - first) % DAY == 0 and first < x < end for x in (v, t)) or v > t:
        return "split: as the schema's split section says (" + ", ".join(
            f"{k} {x}" for k, x in split.model_dump(exclude_none=True).items()) + ")"
    days = lambda a, b: f"{_day(a)}" + (f" .. {_day(b - DAY)}" if b - a > DAY else "") + f" ({(b - a) // DAY} day{'s' if b - a > DAY else ''})"
    return f"split: train {days(first, v)}, valid {days(v, t)}, test {days(t, end)}"


def world_header(config: SyntheticConfig, schema: DataSchema | None = None, command: str | None = None) -> str:
    """The comment block on top of a generated world's schema file: the world it belongs to
    (users, scenarios with their volume shares, days, split days, seed) and the command that made it."""
    schema = config.schema() if schema is None else schema
    shares = ", ".join(f"{d.name} {x:.4g}" for d, x in zip(config.scenario_defs(), config.shares))
    command = command or f"mtfm prepare --source synthetic {world_flags(config)} --out DIR"
    lines = [
        f"{WORLD_HEADER_MARK} (generated with its true probabilities, so the oracle is known):",
        f"#   users {config.users:,}, seed {config.seed}",
        f"#   {config.num_scenarios} scenario(s), share of the exposure volume: {shares}",
        f"#   {config.days} exposure days from {_day(config.start_ts)} (after {config.history_days} behaviour-only days)",
        f"#   {_split_text(config, schema)}",
        f"#   made by: {command}",
        "#   every other generation setting: manifest.json source.config (or synthetic.json beside the tables)",
    ]
    return "\n".join(lines) + "\n"


_YAML_HEADER = (
    "# Schema of the default synthetic world (3 scenarios, 14 exposure days), generated by\n"
    "#   python -c \"from mtfm.data.sources.synthetic import synthetic_schema, schema_yaml; "
    "print(schema_yaml(synthetic_schema()), end='')\" > src/mtfm/configs/synthetic.yaml\n"
    "# tests/test_synthetic.py checks that it equals synthetic_schema(); edit the code, not this file.\n"
)


def packaged_schema_path() -> Path:
    """Path of the checked-in YAML schema of the default (3-scenario, 14-day) world."""
    return Path(str(importlib.resources.files("mtfm") / "configs" / "synthetic.yaml"))


def load_packaged_schema() -> DataSchema:
    return load_schema(packaged_schema_path())


# --------------------------------------------------------------------------------------------
# Vectorised sampling helpers
# --------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _row_cdf_sampler(probs: np.ndarray) -> np.ndarray:
    """Flat, globally increasing CDF: row r occupies the interval [r, r + 1).

    One ``searchsorted`` then samples a category for many (row, uniform) pairs at once,
    without materialising an [events x categories] matrix.
    """
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    return (cdf + np.arange(probs.shape[0])[:, None]).ravel()


def _sample_from_rows(flat_cdf: np.ndarray, width: int, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Category index per event, drawn from row ``rows[i]`` of a :func:`_row_cdf_sampler`."""
    idx = np.searchsorted(flat_cdf, rows + u, side="right")
    return np.minimum(idx - rows * width, width - 1)


class _GuidedCdf:
    """Exact inverse-CDF lookup with a guide table (Chen & Asau 1974).

    ``self(x)`` equals ``min(searchsorted(cdf, x, side="right"), n - 1)`` for ``0 <= x < top``,
    but replaces the binary search per draw by one gather plus a few vectorised steps
    (a bucket holds few items), which matters for the tens of millions of item draws.
    """

    def __init__(self, cdf: np.ndarray, top: float) -> None:
        self.cdf = cdf
        self.scale = 4 * cdf.size / top
        self.guide = np.searchsorted(cdf, np.arange(4 * cdf.size + 1) / self.scale, side="right")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        bucket = np.minimum((x * self.scale).astype(np.int64), self.guide.size - 1)
        i = np.minimum(self.guide[bucket], self.cdf.size - 1)
        behind = np.flatnonzero(self.cdf[i] <= x)
        while behind.size:
            i[behind] += 1
            np.minimum(i, self.cdf.size - 1, out=i)
            behind = behind[(self.cdf[i[behind]] <= x[behind]) & (i[behind] < self.cdf.size - 1)]
        return i


def _sorted_search(sorted_keys: np.ndarray, queries: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``searchsorted(sorted_keys, queries, side="left")``, run on the queries in sorted order.

    ``order`` sorts ``queries`` (callers share one argsort between queries that sort alike).
    Sorted probes sweep the keys cache-friendly; with the argsort still about twice as fast
    as random probes for the large key arrays of the past-only features.
    """
    out = np.empty(queries.size, dtype=np.int64)
    out[order] = np.searchsorted(sorted_keys, queries[order], side="left")
    return out


def _group_rank(sorted_groups: np.ndarray) -> np.ndarray:
    """0-based position of every element inside its run of equal (sorted) group keys."""
    n = sorted_groups.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, lengths)


# --------------------------------------------------------------------------------------------
# Item catalogs (depend on the seed only, shared by all user blocks)
# --------------------------------------------------------------------------------------------


@dataclass
class _Catalog:
    """Items of one scenario, with their features and per-cuisine popularity samplers."""

    cuisine: np.ndarray
    price_bucket: np.ndarray
    quality: np.ndarray  # latent click appeal
    conv_quality: np.ndarray  # latent conversion appeal
    popularity: np.ndarray  # Zipf weights
    attrs: dict[str, np.ndarray] = field(default_factory=dict)  # kind-specific item columns
    tags: tuple[np.ndarray, np.ndarray] | None = None  # (values, offsets) of dish tags
    by_cuisine_order: np.ndarray = field(init=False)
    by_cuisine: _GuidedCdf = field(init=False)
    overall: _GuidedCdf = field(init=False)

    def __post_init__(self) -> None:
        order = np.lexsort((np.arange(self.cuisine.size), self.cuisine))
        w = self.popularity[order]
        cs = self.cuisine[order]
        within = np.cumsum(w)
        starts = np.searchsorted(cs, np.arange(NUM_CUISINES))
        if np.any(np.bincount(cs, minlength=NUM_CUISINES) == 0):
            raise RuntimeError("synthetic catalog: every cuisine needs at least one item")
        base = np.r_[0.0, within][starts][cs]  # weight of all items of earlier cuisines
        totals = np.bincount(cs, weights=w, minlength=NUM_CUISINES)
        cdf = (within - base) / totals[cs]
        last = np.r_[starts[1:] - 1, cs.size - 1]
        cdf[last] = 1.0
        self.by_cuisine_order = order
        self.by_cuisine = _GuidedCdf(cdf + cs, NUM_CUISINES)  # cuisine c occupies [c, c + 1)
        g = np.cumsum(self.popularity) / self.popularity.sum()
        g[-1] = 1.0
        self.overall = _GuidedCdf(g, 1.0)

    @property
    def size(self) -> int:
        return int(self.cuisine.size)

    def sample_in_cuisine(self, cuisine: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item of the given cuisine, by popularity within that cuisine (u uniform in [0, 1))."""
        return self.by_cuisine_order[self.by_cuisine(cuisine + u)]

    def sample_popular(self, u: np.ndarray) -> np.ndarray:
        """Item by overall popularity (u uniform in [0, 1))."""
        return self.overall(u)


def _zipf_popularity(rng: np.random.Generator, n: int, exponent: float = 1.05) -> np.ndarray:
    return 1.0 / rng.permutation(np.arange(1, n + 1)) ** exponent


def _base_catalog(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    cuisine_p = 1.0 / np.arange(1, NUM_CUISINES + 1) ** 0.6
    cuisine = rng.choice(NUM_CUISINES, size=n, p=cuisine_p / cuisine_p.sum())
    cuisine[:NUM_CUISINES] = np.arange(NUM_CUISINES)  # every cuisine exists
    quality = rng.normal(0.0, 0.5, n)
    return {
        "cuisine": cuisine,
        "quality": quality,
        "conv_quality": 0.5 * quality + rng.normal(0.0, 0.4, n),
        "popularity": _zipf_popularity(rng, n),
    }


def _quartiles(x: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.quantile(x, [0.25, 0.5, 0.75]), x, side="right")


def _restaurant_catalog(rng: np.random.Generator, d: ScenarioDef) -> _Catalog:
    b = _base_catalog(rng, d.n_items)
    n = d.n_items
    price_level = np.clip((b["cuisine"] % 4 + rng.integers(-1, 2, n)), 0, NUM_PRICE_BUCKETS - 1)
    attrs = {
        "price_level": price_level,
        "rating": np.clip(4.2 + 0.35 * b["quality"] + rng.normal(0, 0.2, n), 2.5, 5.0),
        "monthly_sales": np.round(b["popularity"] / b["popularity"].max() * 2e4 * rng.lognormal(0, 0.4, n)),
        "delivery_base": rng.normal(0.0, 4.0, n),
    }
    return _Catalog(b["cuisine"], price_level, b["quality"], b["conv_quality"], b["popularity"], attrs)


def _dish_catalog(rng: np.random.Generator, d: ScenarioDef, restaurants: _Catalog) -> _Catalog:
    n = d.n_items
    restaurant = restaurants.sample_popular(rng.random(n))
    b = _base_catalog(rng, n)
    cuisine = restaurants.cuisine[restaurant]
    dish_type = rng.integers(0, NUM_DISH_TYPES, n)
    price = np.round(rng.lognormal(2.6 + 0.15 * dish_type + 0.2 * restaurants.price_bucket[restaurant], 0.45), 1)
    k = rng.integers(0, MAX_DISH_TAGS + 1, n)
    chosen = np.argsort(rng.random((n, NUM_DISH_TAGS)), axis=1)[:, :MAX_DISH_TAGS]
    keep = np.arange(MAX_DISH_TAGS)[None, :] < k[:, None]
    tag_values = np.sort(np.where(keep, chosen, NUM_DISH_TAGS), axis=1)[keep]  # first k per row, sorted
    tag_offsets = np.r_[0, np.cumsum(k)]
    attrs = {"restaurant": restaurant, "dish_type": dish_type, "price": price}
    return _Catalog(cuisine, _quartiles(price), b["quality"], b["conv_quality"], b["popularity"], attrs,
                    tags=(tag_values.astype(np.int32), tag_offsets))


def _coupon_catalog(rng: np.random.Generator, d: ScenarioDef) -> _Catalog:
    n = d.n_items
    b = _base_catalog(rng, n)
    brand_cuisine = rng.integers(0, NUM_CUISINES, NUM_BRANDS)
    brand_cuisine[:NUM_CUISINES] = np.arange(NUM_CUISINES)
    # Each package's brand sells its cuisine: pick uniformly among the brands of that cuisine.
    brands_sorted = np.argsort(brand_cuisine, kind="stable")
    counts = np.bincount(brand_cuisine, minlength=NUM_CUISINES)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    brand = brands_sorted[starts[b["cuisine"]] + (rng.random(n) * counts[b["cuisine"]]).astype(np.int64)]
    package_price = np.round(rng.lognormal(3.4, 0.5, n), 1)
    attrs = {
        "brand": brand,
        "discount": np.round(rng.uniform(0.5, 0.95, n), 2),
        "validity_days": np.asarray(VALIDITY_DAYS)[rng.choice(4, size=n, p=[0.2, 0.3, 0.35, 0.15])],
        "package_price": package_price,
    }
    return _Catalog(b["cuisine"], _quartiles(package_price), b["quality"], b["conv_quality"], b["popularity"], attrs)


def _generic_catalog(rng: np.random.Generator, d: ScenarioDef) -> _Catalog:
    n = d.n_items
    b = _base_catalog(rng, n)
    price = np.round(rng.lognormal(3.0, 0.6, n), 1)
    attrs = {
        "style": rng.integers(0, _num_styles(d.index), n),
        "price": price,
        "score": b["quality"] + rng.normal(0, 1.0, n),
    }
    return _Catalog(b["cuisine"], _quartiles(price), b["quality"], b["conv_quality"], b["popularity"], attrs)


def _build_catalogs(cfg: SyntheticConfig) -> list[_Catalog]:
    """One catalog per scenario, seeded by (seed, scenario) so it is the same for every block."""
    catalogs: list[_Catalog] = []
    for d in scenario_defs(cfg.num_scenarios):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, d.index]))
        if d.kind == "restaurant":
            catalogs.append(_restaurant_catalog(rng, d))
        elif d.kind == "dish":
            catalogs.append(_dish_catalog(rng, d, catalogs[0]))
        elif d.kind == "coupon":
            catalogs.append(_coupon_catalog(rng, d))
        else:
            catalogs.append(_generic_catalog(rng, d))
    return catalogs


# --------------------------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------------------------


@dataclass
class _Users:
    """Latent traits of one block of users; shared by every scenario (the transferable part)."""

    uid: np.ndarray
    theta: np.ndarray  # [n, cuisines] cuisine preference
    beta: np.ndarray  # price sensitivity
    deal: np.ndarray  # deal seeking (coupons)
    bias: np.ndarray  # general click propensity
    active_p: np.ndarray  # probability to be active on a day
    intensity: np.ndarray  # activity multiplier
    page_rate: np.ndarray  # [n, scenarios] expected pages per active day (0 = never uses it)
    search_rate: float  # weight of organic search next to page_rate in the pre-period
    distance_dislike: np.ndarray
    dish_pref: np.ndarray  # [n, dish types], PHF only
    style_pref: np.ndarray  # [n, scenarios, styles], generic scenarios only
    static: dict[str, np.ndarray]  # observable scenario-specific user features


def _page_rates(cfg: SyntheticConfig, defs: list[ScenarioDef]) -> np.ndarray:
    """Pages per active day per scenario such that exposures follow the scenario shares."""
    shares = np.array([d.share for d in defs])
    shares = shares / shares.sum()
    per_scenario_exposures = cfg.exposures_per_active_day * shares
    p_use = np.array([d.p_use for d in defs])
    size = np.array([d.page_size for d in defs])
    return per_scenario_exposures / (p_use * size * math.exp(0.5 * 0.5**2) * math.exp(0.5 * 0.4**2))


def _make_users(cfg: SyntheticConfig, defs: list[ScenarioDef], rng: np.random.Generator, first: int, n: int) -> _Users:
    S = len(defs)
    theta = rng.normal(0.0, 0.8, (n, NUM_CUISINES))
    fav = rng.integers(0, NUM_CUISINES, (n, 2))
    theta[np.arange(n)[:, None], fav] += 1.0
    beta = rng.normal(0.0, 1.0, n)
    deal = 0.6 * beta + 0.8 * rng.normal(0.0, 1.0, n)
    bias = rng.normal(0.0, 0.4, n)
    active_p = _sigmoid(rng.normal(0.3, 1.2, n))
    intensity = rng.lognormal(0.0, 0.5, n)
    uses = rng.random((n, S)) < np.array([d.p_use for d in defs])
    page_rate = _page_rates(cfg, defs)[None, :] * intensity[:, None] * rng.lognormal(0.0, 0.4, (n, S)) * uses
    age_group = rng.integers(0, 6, n)
    dish_pref = rng.normal(0.0, 0.5, (n, NUM_DISH_TYPES))
    dish_pref[np.arange(n), age_group] += 0.5
    noise = rng.normal(0.0, 0.5, (4, n))
    static = {
        "member_level": np.clip((active_p * 4 + bias + noise[0]).round(), 0, 4),
        "age_group": age_group,
        "coupon_user": (deal + noise[1] > 0.5).astype(np.int64),
        "price_tier": np.searchsorted([-0.5, 0.5], deal + noise[2]),
        "segment": np.searchsorted([-0.8, 0.0, 0.8], beta + noise[3]),
    }
    return _Users(
        uid=np.arange(first, first + n, dtype=np.int64), theta=theta, beta=beta, deal=deal, bias=bias,
        active_p=active_p, intensity=intensity, page_rate=page_rate, search_rate=0.5 * _page_rates(cfg, defs).mean(),
        distance_dislike=np.abs(rng.normal(0.6, 0.3, n)), dish_pref=dish_pref,
        style_pref=rng.normal(0.0, 0.6, (n, S, NUM_STYLES)), static=static,
    )


# --------------------------------------------------------------------------------------------
# Behaviour outside the logged feeds (pre-period, organic search)
# --------------------------------------------------------------------------------------------


def _user_time_key(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """One int64 that sorts like (user, ts): a single argsort is faster than a lexsort."""
    return (user.astype(np.int64) << 32) | (ts - (ts.min() if ts.size else 0))


@dataclass
class _Events:
    """Behaviour rows (clicks or orders) of one block; ``item_id`` is the raw global item id."""

    user: np.ndarray
    ts: np.ndarray
    scenario: np.ndarray
    item_id: np.ndarray
    cuisine: np.ndarray
    price_bucket: np.ndarray
    amount: np.ndarray

    @staticmethod
    def concat(parts: list["_Events"]) -> "_Events":
        cols = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _Events.__dataclass_fields__}
        order = np.argsort(_user_time_key(cols["user"], cols["ts"]), kind="stable")
        return _Events(**{k: v[order] for k, v in cols.items()})


def _order_amount(rng: np.random.Generator, d: ScenarioDef, cat: _Catalog, items: np.ndarray) -> np.ndarray:
    """Order value: depends on the item's price, so the ``amount`` feature tracks price taste."""
    if d.kind == "restaurant":
        return np.round(rng.lognormal(3.0 + 0.25 * cat.attrs["price_level"][items], 0.3), 1)
    if d.kind == "dish":
        return cat.attrs["price"][items] * rng.integers(1, 4, items.size)
    if d.kind == "coupon":
        return cat.attrs["package_price"][items]
    return cat.attrs["price"][items]


def _organic_events(
    rng: np.random.Generator, defs: list[ScenarioDef], catalogs: list[_Catalog], users: _Users,
    span: tuple[int, int], per_active_day: float, feeds_too: bool, taste_sharpness: float,
) -> _Events:
    """Clicks or orders not tied to a logged exposure: the pre-period and organic search.

    ``feeds_too``: before the first exposure day behaviour also happens inside the scenarios
    (their exposures are simply not logged); afterwards only search is organic. Cuisines
    follow the user's taste, so the log reveals the same preference the feeds reward.
    """
    n = users.uid.size
    days = (span[1] - span[0]) / DAY
    count = rng.poisson(per_active_day * days * users.active_p * users.intensity)
    user = np.repeat(np.arange(n), count)
    m = user.size
    ts = rng.integers(span[0], span[1], m)
    if feeds_too:
        weights = np.c_[np.full(n, users.search_rate), users.page_rate]
        scenario = _sample_from_rows(_row_cdf_sampler(weights + 1e-9), weights.shape[1], user, rng.random(m))
    else:
        scenario = np.full(m, SCENARIO_SEARCH)
    taste = _sample_from_rows(_row_cdf_sampler(_softmax_rows(taste_sharpness * users.theta)), NUM_CUISINES,
                              user, rng.random(m))
    cuisine = np.where(rng.random(m) < 0.8, taste, rng.integers(0, NUM_CUISINES, m))
    u_item = rng.random(m)
    item_id = np.zeros(m, dtype=np.int64)
    price_bucket = np.zeros(m, dtype=np.int64)
    amount = np.zeros(m)
    for j in range(len(defs) + 1):
        sel = np.flatnonzero(scenario == j)
        k = max(j - 1, 0)  # search finds restaurants
        items = catalogs[k].sample_in_cuisine(cuisine[sel], u_item[sel])
        item_id[sel] = defs[k].index * ITEM_ID_STRIDE + items
        cuisine[sel] = catalogs[k].cuisine[items]
        price_bucket[sel] = catalogs[k].price_bucket[items]
        amount[sel] = _order_amount(rng, defs[k], catalogs[k], items)
    return _Events(user, ts, scenario, item_id, cuisine, price_bucket, amount)


# --------------------------------------------------------------------------------------------
# Feed pages and exposures
# --------------------------------------------------------------------------------------------


def _session_starts(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Seconds after midnight: mostly around lunch and dinner, clipped to 07:00-21:30."""
    comp = rng.choice(3, size=shape, p=[0.4, 0.4, 0.2])
    lunch = rng.normal(12.0, 1.0, shape)
    dinner = rng.normal(18.5, 1.2, shape)
    other = rng.uniform(8.0, 21.5, shape)
    hours = np.choose(comp, [lunch, dinner, other])
    return np.clip(hours, 7.0, 21.5) * 3600.0


def _make_pages(cfg: SyntheticConfig, users: _Users, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Feed requests: (user, scenario, ts, rank) sorted by user then time.

    Users are active on some days only; a user never uses a scenario when its rate is 0.
    Pages gather into one or two sessions per day and are pushed apart to at least
    ``MIN_PAGE_GAP_S`` seconds with one segmented cumulative max (no loop over users).
    """
    n, D, S = users.uid.size, cfg.days, users.page_rate.shape[1]
    active = rng.random((n, D)) < users.active_p[:, None]
    cap = max(1, MAX_PAGES_PER_DAY // S)
    counts = np.minimum(rng.poisson(users.page_rate[:, None, :] * active[:, :, None]), cap)
    cell = np.repeat(np.arange(n * D * S), counts.ravel())
    u, d, s = cell // (D * S), (cell // S) % D, cell % S
    per_day = counts.sum(axis=2)
    sessions = 1 + (rng.random((n, D)) < 0.4)
    starts = _session_starts(rng, (n, D, 2))
    k = (rng.random(u.size) * sessions[u, d]).astype(np.int64)
    rel = d * DAY + (starts[u, d, k] + rng.random(u.size) * 90.0 * per_day[u, d]).astype(np.int64)
    order = np.argsort(_user_time_key(u, rel), kind="stable")
    u, d, s, rel = u[order], d[order], s[order], rel[order]
    rank = _group_rank(u)
    stride = 2 * (D + 1) * DAY
    rel = np.maximum.accumulate(rel - MIN_PAGE_GAP_S * rank + u * stride) - u * stride + MIN_PAGE_GAP_S * rank
    if np.any(rel // DAY != d):
        raise RuntimeError("synthetic: a feed page was pushed out of its day; lower exposures_per_active_day")
    return {"user": u, "scenario": s, "ts": cfg.start_ts + rel, "rank": rank}


def _expand_pages(defs: list[ScenarioDef], pages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One exposure row per item slot of every page (same timestamp within a page)."""
    size = np.array([d.page_size for d in defs])[pages["scenario"]]
    page = np.repeat(np.arange(size.size), size)
    return {
        "page": page,
        "user": pages["user"][page],
        "scenario": pages["scenario"][page],
        "ts": pages["ts"][page],
        "rank": pages["rank"][page],
    }


def _pick_items(cfg: SyntheticConfig, catalogs: list[_Catalog], users: _Users, ex: dict[str, np.ndarray],
                rng: np.random.Generator) -> None:
    """Item per exposure: part by the user's taste (cuisine first), part by popularity."""
    m = ex["user"].size
    taste_cdf = _row_cdf_sampler(_softmax_rows(users.theta))
    item = np.zeros(m, dtype=np.int64)
    for j, cat in enumerate(catalogs):
        sel = np.flatnonzero(ex["scenario"] == j)
        taste = _sample_from_rows(taste_cdf, NUM_CUISINES, ex["user"][sel], rng.random(sel.size))
        u_item = rng.random(sel.size)
        personal = rng.random(sel.size) < cfg.personalization
        item[sel] = np.where(personal, cat.sample_in_cuisine(taste, u_item), cat.sample_popular(u_item))
        _dedupe_pages(ex["page"][sel], item, sel, cat, rng)
    ex["item"] = item
    ex["cuisine"] = np.zeros(m, dtype=np.int64)
    ex["price_bucket"] = np.zeros(m, dtype=np.int64)
    for j, cat in enumerate(catalogs):
        sel = np.flatnonzero(ex["scenario"] == j)
        ex["cuisine"][sel] = cat.cuisine[item[sel]]
        ex["price_bucket"][sel] = cat.price_bucket[item[sel]]


def _dedupe_pages(page: np.ndarray, item: np.ndarray, sel: np.ndarray, cat: _Catalog,
                  rng: np.random.Generator, rounds: int = 64) -> None:
    """Redraw repeated items inside a page (a feed never shows one item twice in a request).

    Repeats are redrawn from the same cuisine (keeping the taste mix), after a few rounds from
    overall popularity; only the few repeated slots are touched, so this converges quickly.
    """
    for r in range(rounds):
        key = page * cat.size + item[sel]
        order = np.argsort(key, kind="stable")
        dup = np.zeros(sel.size, dtype=bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        if not dup.any():
            return
        redo = sel[dup]
        u = rng.random(redo.size)
        item[redo] = cat.sample_in_cuisine(cat.cuisine[item[redo]], u) if r < 8 else cat.sample_popular(u)
    raise RuntimeError("synthetic: could not fill feed pages with distinct items; the catalog is too small")


def _scenario_logits(d: ScenarioDef, cat: _Catalog, users: _Users, u: np.ndarray, items: np.ndarray,
                     cuisine: np.ndarray, price: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Click and conversion logits (without the real-time term) plus exposure-level columns.

    Shared terms (cuisine taste, price sensitivity, click propensity, item appeal) use the
    same latent traits in every scenario: that is what makes multi-scenario training pay.
    Each kind adds its own terms driven by its own features.
    """
    taste = users.theta[u, cuisine]
    click = d.click_bias + 0.9 * taste - 0.8 * users.beta[u] * price + 0.6 * cat.quality[items] + users.bias[u]
    conv = d.conv_bias + 0.7 * taste - 1.0 * users.beta[u] * price + cat.conv_quality[items] + 0.3 * users.bias[u]
    extra: dict[str, np.ndarray] = {}
    if d.kind == "restaurant":
        dist = rng.choice(NUM_DISTANCE_BUCKETS, size=u.size, p=[0.15, 0.25, 0.25, 0.17, 0.11, 0.07])
        click = click - users.distance_dislike[u] * dist / 2.5
        conv = conv - 0.15 * dist
        extra["distance_bucket"] = dist
        extra["delivery_minutes"] = np.round(18 + 6 * dist + cat.attrs["delivery_base"][items]
                                             + rng.normal(0, 3, u.size), 1)
    elif d.kind == "dish":
        pref = users.dish_pref[u, cat.attrs["dish_type"][items]]
        click, conv = click + pref, conv + 0.5 * pref
    elif d.kind == "coupon":
        discount = (cat.attrs["discount"][items] - 0.725) / 0.13
        click = click + 0.3 * taste + 0.8 * users.deal[u] * discount
        conv = conv + 0.5 * users.deal[u] + 0.3 * discount
    else:
        pref = users.style_pref[u, d.index - 1, cat.attrs["style"][items]]
        click, conv = click + pref, conv + 0.5 * pref
    return click, conv, extra


def _last_before(keys_sorted: np.ndarray, ts_sorted: np.ndarray, group: np.ndarray, key: np.ndarray,
                 span: int) -> np.ndarray:
    """Timestamp of the last event of the same group strictly before each query (or -inf)."""
    order = np.argsort(key, kind="stable")  # also sorts group * span (0 <= key - group * span < span)
    pos = _sorted_search(keys_sorted, key, order) - 1
    first = _sorted_search(keys_sorted, group * span, order)
    ok = pos >= first
    return np.where(ok, ts_sorted[np.maximum(pos, 0)], -np.inf)


def _simulate_clicks(cfg: SyntheticConfig, ex: dict[str, np.ndarray], organic_clicks: _Events, tbase: int,
                     span: int, rng: np.random.Generator) -> None:
    """Clicks, page by page: a recent same-cuisine click (any scenario or search) raises p.

    The loop runs over the page rank (a user's 1st, 2nd, ... page), each step vectorised over
    every user of the block; all clicks of earlier pages precede the current page (page gap >
    click delay), so the state is exactly "clicks strictly before this timestamp".
    """
    m = ex["user"].size
    n_users = int(ex["user"].max()) + 1 if m else 0
    g = ex["user"] * NUM_CUISINES + ex["cuisine"]
    okeys = (organic_clicks.user * NUM_CUISINES + organic_clicks.cuisine) * span + (organic_clicks.ts - tbase)
    oorder = np.argsort(okeys, kind="stable")
    organic_last = _last_before(okeys[oorder], organic_clicks.ts[oorder].astype(np.float64), g,
                                g * span + (ex["ts"] - tbase), span)
    feed_last = np.full(n_users * NUM_CUISINES, -np.inf)
    uniform = rng.random(m)
    ex["click_ts"] = ex["ts"] + rng.integers(CLICK_DELAY_S[0], CLICK_DELAY_S[1] + 1, m)
    ex["p_click"] = np.zeros(m)
    ex["click"] = np.zeros(m, dtype=bool)
    perm = np.argsort(ex["rank"], kind="stable")
    bounds = np.searchsorted(ex["rank"][perm], np.arange(int(ex["rank"].max(initial=-1)) + 2))
    horizon = ex["ts"] - cfg.realtime_window_s
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = perm[a:b]
        recent = np.maximum(feed_last[g[idx]], organic_last[idx]) >= horizon[idx]
        p = _sigmoid(ex["base_click"][idx] + cfg.realtime_boost * recent)
        clicked = uniform[idx] < p
        ex["p_click"][idx], ex["click"][idx] = p, clicked
        hit = idx[clicked]
        np.maximum.at(feed_last, g[hit], ex["click_ts"][hit].astype(np.float64))


def _redemptions(users: _Users, cat: _Catalog, u: np.ndarray, items: np.ndarray, cuisine: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coupon redemption given conversion: (p_24h, p_30m_given_24h, u_24h, u_30m).

    Short validity and deal seeking favour redemption; taste for the cuisine favours eating
    right away (within 30 minutes). Redeemed within 30 min implies redeemed within 24 h.
    """
    log_validity = np.log(cat.attrs["validity_days"][items])
    p_write = _sigmoid(1.2 - 0.5 * log_validity + 0.4 * users.deal[u])
    p_imd = _sigmoid(0.5 * users.theta[u, cuisine] - 0.3 * log_validity)
    return p_write, p_imd, rng.random(u.size), rng.random(u.size)


# --------------------------------------------------------------------------------------------
# Features computed from the past only
# --------------------------------------------------------------------------------------------


def _past_ctr(user: np.ndarray, cuisine: np.ndarray, rel_ts: np.ndarray, click: np.ndarray, span: int,
              prior: float) -> np.ndarray:
    """Smoothed CTR of the user on this cuisine over exposures strictly earlier in time.

    Exposures with the same timestamp (the same page) are excluded; their clicks come later.
    """
    g = user * NUM_CUISINES + cuisine
    key = g * span + rel_ts
    order = np.argsort(key, kind="stable")
    ks = key[order]
    clicks_before_pos = np.r_[0, np.cumsum(click[order])]
    first, before = np.empty_like(order), np.empty_like(order)
    first[order] = np.searchsorted(ks, (g * span)[order], side="left")  # sorted queries: a fast sweep
    before[order] = np.searchsorted(ks, ks, side="left")
    clicks = clicks_before_pos[before] - clicks_before_pos[first]
    return (clicks + CTR_PRIOR_WEIGHT * prior) / (before - first + CTR_PRIOR_WEIGHT)


def _count_before(keys_sorted: np.ndarray, group: np.ndarray, key: np.ndarray, span: int, lower: np.ndarray | int = 0
                  ) -> np.ndarray:
    """Events of the same group with relative time in [lower, query time).

    One sort order serves both searches: ``lower`` does not decrease with the query time
    inside a group (if it did, results would stay exact, only slower).
    """
    order = np.argsort(key, kind="stable")
    return _sorted_search(keys_sorted, key, order) - _sorted_search(keys_sorted, group * span + lower, order)


# --------------------------------------------------------------------------------------------
# One block of users -> tables
# --------------------------------------------------------------------------------------------

_ID, _CAT, _NUM, _LABEL, _PROB = pl.Int64, pl.Int32, pl.Float32, pl.Int8, pl.Float64


def _frame(columns: dict[str, tuple[np.ndarray | pl.Series, pl.DataType]]) -> pl.DataFrame:
    return pl.DataFrame([
        (v if isinstance(v, pl.Series) else pl.Series(name, v)).alias(name).cast(dtype)
        for name, (v, dtype) in columns.items()
    ])


def _list_column(values: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> pl.Series:
    """Gather each item's variable-length list (values + offsets) into a polars list column."""
    lengths = np.diff(offsets)[items]
    out_offsets = np.r_[0, np.cumsum(lengths)]
    within = np.arange(out_offsets[-1]) - np.repeat(out_offsets[:-1], lengths)
    flat = values[np.repeat(offsets[:-1][items], lengths) + within]
    arr = pa.LargeListArray.from_arrays(pa.array(out_offsets, pa.int64()), pa.array(flat, pa.int32()))
    return pl.from_arrow(arr)


def _item_columns(d: ScenarioDef, cat: _Catalog, items: np.ndarray, extra: dict[str, np.ndarray]
                  ) -> dict[str, tuple[np.ndarray | pl.Series, pl.DataType]]:
    a = cat.attrs
    raw_id = d.index * ITEM_ID_STRIDE + items
    if d.kind == "restaurant":
        return {
            "restaurant_id": (raw_id, _ID), "cuisine": (cat.cuisine[items], _CAT),
            "price_level": (a["price_level"][items], _CAT), "distance_bucket": (extra["distance_bucket"], _CAT),
            "rating": (a["rating"][items], _NUM), "monthly_sales": (a["monthly_sales"][items], _NUM),
            "delivery_minutes": (extra["delivery_minutes"], _NUM),
        }
    if d.kind == "dish":
        assert cat.tags is not None
        return {
            "dish_id": (raw_id, _ID), "restaurant_id": (ITEM_ID_STRIDE + a["restaurant"][items], _ID),
            "cuisine": (cat.cuisine[items], _CAT), "dish_type": (a["dish_type"][items], _CAT),
            "price": (a["price"][items], _NUM), "dish_tags": (_list_column(*cat.tags, items), pl.List(pl.Int32)),
        }
    if d.kind == "coupon":
        return {
            "package_id": (raw_id, _ID), "brand": (a["brand"][items], _CAT), "cuisine": (cat.cuisine[items], _CAT),
            "discount": (a["discount"][items], _NUM), "validity_days": (a["validity_days"][items], _CAT),
            "package_price": (a["package_price"][items], _NUM),
        }
    return {
        "item_id": (raw_id, _ID), "cuisine": (cat.cuisine[items], _CAT), "style": (a["style"][items], _CAT),
        "price": (a["price"][items], _NUM), "score": (a["score"][items], _NUM),
    }


def _user_columns(d: ScenarioDef, users: _Users, u: np.ndarray, daily: dict[str, np.ndarray]
                  ) -> dict[str, tuple[np.ndarray, pl.DataType]]:
    p, st = d.prefix, users.static
    if d.kind == "restaurant":
        return {f"{p}_member_level": (st["member_level"][u], _CAT), f"{p}_orders_7d": (daily["orders_7d"], _NUM)}
    if d.kind == "dish":
        return {f"{p}_age_group": (st["age_group"][u], _CAT),
                f"{p}_days_since_order": (daily["days_since_order"], _NUM)}
    if d.kind == "coupon":
        return {f"{p}_coupon_user": (st["coupon_user"][u], _CAT), f"{p}_price_tier": (st["price_tier"][u], _CAT)}
    return {f"{p}_segment": (st["segment"][u], _CAT)}


def _daily_user_features(orders: _Events, user: np.ndarray, ts: np.ndarray, tbase: int, span: int
                         ) -> dict[str, np.ndarray]:
    """Snapshots at the start of the exposure's day, from orders strictly before that instant."""
    day_rel = (ts - tbase) - (ts - tbase) % DAY
    keys = orders.user * span + (orders.ts - tbase)  # orders are sorted by (user, ts)
    query = user * span + day_rel
    orders_7d = _count_before(keys, user, query, span, np.maximum(day_rel - 7 * DAY, 0))
    last = _last_before(keys, orders.ts.astype(np.float64), user, query, span)
    days_since = np.minimum((tbase + day_rel - last) / DAY, 30.0)
    return {"orders_7d": orders_7d, "days_since_order": days_since}


def _events_frame(ev: _Events, uid: np.ndarray, with_amount: bool) -> pl.DataFrame:
    cols = {
        "user_id": (uid[ev.user], _ID), "ts": (ev.ts, _ID), "scenario": (ev.scenario, _CAT),
        "item_id": (ev.item_id, _ID), "cuisine": (ev.cuisine, _CAT), "price_bucket": (ev.price_bucket, _CAT),
    }
    if with_amount:
        cols["amount"] = (ev.amount, _NUM)
    return _frame(cols)


@dataclass(frozen=True)
class _Clock:
    """Time frame of a world: behaviour starts at ``tbase``, exposures in [start, end)."""

    tbase: int
    start: int
    end: int
    span: int  # > any relative time (orders may land after the last exposure day)

    @staticmethod
    def of(cfg: SyntheticConfig) -> "_Clock":
        return _Clock(cfg.start_ts - cfg.history_days * DAY, cfg.start_ts, cfg.start_ts + cfg.days * DAY,
                      (cfg.history_days + cfg.days + 2) * DAY)


def _simulate_feeds(cfg: SyntheticConfig, defs: list[ScenarioDef], catalogs: list[_Catalog], users: _Users,
                    organic_clicks: _Events, clock: _Clock, rng: np.random.Generator
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Pages, items, clicks and conversions of every exposure of a block (scenario order).

    Returns the exposure arrays and, per scenario, its exposure-level item columns.
    """
    ex = _expand_pages(defs, _make_pages(cfg, users, rng))
    _pick_items(cfg, catalogs, users, ex, rng)
    m = ex["user"].size
    ex["base_click"], ex["base_conv"] = np.zeros(m), np.zeros(m)
    extras: list[dict[str, np.ndarray]] = []
    for j, (d, cat) in enumerate(zip(defs, catalogs)):
        sel = np.flatnonzero(ex["scenario"] == j)
        price = ex["price_bucket"][sel] / (NUM_PRICE_BUCKETS - 1) - 0.5
        click, conv, extra = _scenario_logits(d, cat, users, ex["user"][sel], ex["item"][sel], ex["cuisine"][sel],
                                              price, rng)
        ex["base_click"][sel], ex["base_conv"][sel] = click, conv
        extras.append(extra)
    _simulate_clicks(cfg, ex, organic_clicks, clock.tbase, clock.span, rng)
    ex["p_conv"] = _sigmoid(ex["base_conv"])
    ex["conversion"] = ex["click"] & (rng.random(m) < ex["p_conv"])
    ex["order_ts"] = ex["click_ts"] + rng.integers(ORDER_DELAY_S[0], ORDER_DELAY_S[1] + 1, m)
    return ex, extras


def _feed_events(defs: list[ScenarioDef], catalogs: list[_Catalog], ex: dict[str, np.ndarray],
                 rng: np.random.Generator) -> tuple[_Events, _Events]:
    """The feeds' clicks and orders as behaviour rows (scenario ids 1..S)."""
    item_id = np.array([d.index for d in defs])[ex["scenario"]] * ITEM_ID_STRIDE + ex["item"]
    amount = np.zeros(ex["user"].size)
    for j, (d, cat) in enumerate(zip(defs, catalogs)):
        sel = np.flatnonzero((ex["scenario"] == j) & ex["conversion"])
        amount[sel] = _order_amount(rng, d, cat, ex["item"][sel])

    def rows(mask: np.ndarray, ts: np.ndarray) -> _Events:
        return _Events(ex["user"][mask], ts[mask], ex["scenario"][mask] + 1, item_id[mask], ex["cuisine"][mask],
                       ex["price_bucket"][mask], amount[mask])

    return rows(ex["click"], ex["click_ts"]), rows(ex["conversion"], ex["order_ts"])


def _scenario_frame(cfg: SyntheticConfig, d: ScenarioDef, cat: _Catalog, users: _Users, ex: dict[str, np.ndarray],
                    sel: np.ndarray, extra: dict[str, np.ndarray], past: dict[str, np.ndarray],
                    clock: _Clock, rng: np.random.Generator) -> pl.DataFrame:
    """The exposure table of one scenario: ids, user / cross / item features, labels, oracles."""
    u = ex["user"][sel]
    ctr = _past_ctr(u, ex["cuisine"][sel], ex["ts"][sel] - clock.tbase, ex["click"][sel], clock.span, CTR_PRIOR)
    cols: dict[str, tuple[np.ndarray | pl.Series, pl.DataType]] = {
        "user_id": (users.uid[u], _ID), "ts": (ex["ts"][sel], _ID),
        "request_id": (users.uid[u] * (cfg.days * MAX_PAGES_PER_DAY) + ex["rank"][sel], _ID),
    }
    cols |= _user_columns(d, users, u, {k: v[sel] for k, v in past.items()})
    cols[f"{d.prefix}_user_cuisine_ctr"] = (ctr, _NUM)
    cols[f"{d.prefix}_user_cuisine_orders"] = (past["cuisine_orders"][sel], _NUM)
    cols |= _item_columns(d, cat, ex["item"][sel], extra)
    click, conv = ex["click"][sel], ex["conversion"][sel]
    p_ctr, p_ctcvr = ex["p_click"][sel], ex["p_click"][sel] * ex["p_conv"][sel]
    cols |= {"click": (click, _LABEL), "conversion": (conv, _LABEL), "p_ctr": (p_ctr, _PROB),
             "p_ctcvr": (p_ctcvr, _PROB)}
    if d.kind == "coupon":
        p_w, p_i, u_w, u_i = _redemptions(users, cat, u, ex["item"][sel], ex["cuisine"][sel], rng)
        write = conv & (u_w < p_w)
        cols |= {"redeem_30m": (write & (u_i < p_i), _LABEL), "redeem_24h": (write, _LABEL),
                 "p_imd": (p_ctcvr * p_w * p_i, _PROB), "p_write": (p_ctcvr * p_w, _PROB)}
    return _frame(cols)


def _generate_block(cfg: SyntheticConfig, defs: list[ScenarioDef], catalogs: list[_Catalog], block: int
                    ) -> dict[str, pl.DataFrame]:
    """All tables for users ``[block * block_users, ...)``, from an RNG seeded by (seed, block)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, block]))
    first = block * cfg.block_users
    users = _make_users(cfg, defs, rng, first, min(cfg.block_users, cfg.users - first))
    clock = _Clock.of(cfg)
    pre, during = (clock.tbase, clock.start), (clock.start, clock.end)
    pre_clicks = _organic_events(rng, defs, catalogs, users, pre, 3.0, True, 1.0)
    pre_orders = _organic_events(rng, defs, catalogs, users, pre, 0.6, True, 1.3)
    search_clicks = _organic_events(rng, defs, catalogs, users, during, 0.8, False, 1.0)
    search_orders = _organic_events(rng, defs, catalogs, users, during, 0.2, False, 1.3)

    ex, extras = _simulate_feeds(cfg, defs, catalogs, users, _Events.concat([pre_clicks, search_clicks]), clock, rng)
    feed_clicks, feed_orders = _feed_events(defs, catalogs, ex, rng)
    clicks = _Events.concat([pre_clicks, search_clicks, feed_clicks])
    orders = _Events.concat([pre_orders, search_orders, feed_orders])

    okeys = np.sort((orders.user * NUM_CUISINES + orders.cuisine) * clock.span + (orders.ts - clock.tbase))
    g = ex["user"] * NUM_CUISINES + ex["cuisine"]
    past = _daily_user_features(orders, ex["user"], ex["ts"], clock.tbase, clock.span)
    past["cuisine_orders"] = _count_before(okeys, g, g * clock.span + (ex["ts"] - clock.tbase), clock.span)

    tables = {
        d.table: _scenario_frame(cfg, d, cat, users, ex, np.flatnonzero(ex["scenario"] == j), extras[j], past,
                                 clock, rng)
        for j, (d, cat) in enumerate(zip(defs, catalogs))
    }
    tables["clicks"] = _events_frame(clicks, users.uid, with_amount=False)
    tables["orders"] = _events_frame(orders, users.uid, with_amount=True)
    return tables


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _blocks(cfg: SyntheticConfig, blocks: range) -> list[dict[str, pl.DataFrame]]:
    defs = cfg.scenario_defs()
    catalogs = _build_catalogs(cfg)
    return [_generate_block(cfg, defs, catalogs, b) for b in blocks]


def _concat(parts: list[dict[str, pl.DataFrame]]) -> dict[str, pl.DataFrame]:
    return {name: pl.concat([p[name] for p in parts], rechunk=False) for name in parts[0]}


def generate(config: SyntheticConfig) -> RawTables:
    """Generate the whole world in memory (deterministic by ``config``; see module doc)."""
    tables = _concat(_blocks(config, range(config.num_blocks)))
    schema = config.schema()
    exposures = {s.name: tables[s.table].height for s in schema.scenarios}
    return RawTables(
        schema=schema,
        tables=tables,
        origins={name: f"synthetic:{name}" for name in tables},
        info={"source": "synthetic", "config": config.model_dump(), "exposures": exposures},
    )


@dataclass(frozen=True)
class ParquetWorld:
    """What :func:`write_parquet` wrote: ``out_dir/<table>/part-NNNNN.parquet`` + schema.yaml."""

    out_dir: Path
    schema_path: Path
    files: dict[str, list[Path]]
    rows: dict[str, int]


def write_parquet(config: SyntheticConfig, out_dir: str | Path, users_per_chunk: int,
                  progress: bool = False) -> ParquetWorld:
    """Stream a world of any size to Parquet, one chunk of whole user blocks at a time.

    Memory is bounded by one chunk. ``users_per_chunk`` must be a multiple of
    ``config.block_users`` so that chunks are unions of blocks (the output then equals
    :func:`generate`'s, row for row).
    """
    if users_per_chunk <= 0 or users_per_chunk % config.block_users != 0:
        raise ValueError(f"users_per_chunk must be a positive multiple of block_users={config.block_users}, "
                         f"got {users_per_chunk}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_chunk = users_per_chunk // config.block_users
    defs = config.scenario_defs()
    catalogs = _build_catalogs(config)
    files: dict[str, list[Path]] = {}
    rows: dict[str, int] = {}
    starts = range(0, config.num_blocks, per_chunk)
    for chunk, first in enumerate(tqdm(starts, desc="synthetic chunks", disable=not progress)):
        blocks = range(first, min(first + per_chunk, config.num_blocks))
        tables = _concat([_generate_block(config, defs, catalogs, b) for b in blocks])
        for name, df in tables.items():
            path = out / name / f"part-{chunk:05d}.parquet"
            path.parent.mkdir(exist_ok=True)
            df.write_parquet(path)
            files.setdefault(name, []).append(path)
            rows[name] = rows.get(name, 0) + df.height
    schema_path = out / "schema.yaml"
    command = f"python -m mtfm.data.sources.synthetic {world_flags(config)}" + (
        f" --block-users {config.block_users}" if config.block_users != SyntheticConfig().block_users else "") + (
        f" --out {out}")
    schema_path.write_text(schema_yaml(config.schema(), world_header(config, command=command)))
    (out / "synthetic.json").write_text(config.model_dump_json(indent=2))
    return ParquetWorld(out, schema_path, files, rows)


# --------------------------------------------------------------------------------------------
# Source protocol
# --------------------------------------------------------------------------------------------


def _num_scenarios_for(schema: DataSchema) -> int:
    """How many scenarios to generate so that every scenario the schema names exists."""
    known = {d.name: d.index for d in scenario_defs(64)}
    unknown = [n for n in schema.scenario_names if n not in known]
    if unknown:
        raise SchemaError(f"synthetic source: unknown scenario(s) {unknown}; it generates HP, PHF, SQS, S4, S5, ...")
    return max(known[n] for n in schema.scenario_names)


def _dtype_problem(feature: Feature, dtype: pl.DataType) -> str | None:
    if isinstance(feature, NumericFeature):
        return None if dtype.is_numeric() else "a numeric column"
    if isinstance(feature, MultiCategoricalFeature):
        return None if isinstance(dtype, (pl.List, pl.Array)) else "a list column"
    if feature.num_embeddings is not None:
        return None if dtype.is_integer() else "an integer id column"
    return None if dtype.is_integer() or dtype == pl.String else "an integer or string column"


def check_compatible(schema: DataSchema, tables: dict[str, pl.DataFrame], source: str = "synthetic") -> None:
    """Raise SchemaError naming table and column when a schema asks for something not generated."""
    problems: list[str] = []

    def need(table: str, column: str, expected: str, ok: bool) -> None:
        if not ok:
            problems.append(f"{source}:{table}: column {column!r}: expected {expected}")

    def check_table(table: str, features: list[Feature], extra: list[str]) -> None:
        if table not in tables:
            problems.append(f"{source}: no table {table!r} (generated: {sorted(tables)})")
            return
        df = tables[table]
        for col in (schema.user_column, schema.time.column):
            need(table, col, "an integer column", col in df.columns and df.schema[col].is_integer())
        for f in features:
            why = _dtype_problem(f, df.schema[f.name]) if f.name in df.columns else "a column (missing)"
            need(table, f.name, why or "", why is None)
        for col in extra:
            need(table, col, "a column (missing)", col in df.columns)

    for s in schema.scenarios:
        labels = sorted({c for t in s.tasks for c in t.labels} | {t.oracle_column for t in s.tasks if t.oracle_column})
        check_table(s.table, [*s.user_features, *s.cross_features, *s.item_features], labels)
    for seq in (*schema.history, *schema.realtime):
        check_table(seq.table, list(seq.features), [])
    if schema.time.unit != "s":
        problems.append(f"{source}: time unit must be 's' (synthetic timestamps are seconds), got {schema.time.unit!r}")
    if problems:
        raise SchemaError("schema is not compatible with the synthetic source:\n  " + "\n  ".join(problems))


# The world's knobs as `mtfm prepare` names them (for errors that name the flag).
WORLD_FLAGS = {"users": "--users", "seed": "--seed", "num_scenarios": "--num-scenarios",
               "scenario_shares": "--scenario-shares", "days": "--days", "valid_days": "--valid-days",
               "test_days": "--test-days", "history_days": "--history-days",
               "history_max_len": "--history-max-len", "realtime_max_len": "--realtime-max-len"}
# Knobs of the behaviour log and the sequence caps (long histories for the HTA ablation, issue 13).
BEHAVIOUR_KNOBS = ("history_days", "history_max_len", "realtime_max_len")
SCHEMA_KNOBS = ("history_max_len", "realtime_max_len")  # they shape the generated schema, as the split days do


def _config_error(err: ValidationError) -> ValueError:
    problems = []
    for e in err.errors():
        field_name = str(e["loc"][0]) if e["loc"] else ""
        where = f"{WORLD_FLAGS[field_name]}: " if field_name in WORLD_FLAGS else (f"{field_name}: " if field_name else "")
        problems.append(where + e["msg"].removeprefix("Value error, "))
    return ValueError("synthetic source: invalid world: " + "; ".join(problems))


def load_source(path: str | None, schema: DataSchema | None, users: int | None, seed: int, *,
                num_scenarios: int | None = None, scenario_shares: tuple[float, ...] | None = None,
                days: int | None = None, valid_days: int | None = None, test_days: int | None = None,
                history_days: int | None = None, history_max_len: int | None = None,
                realtime_max_len: int | None = None, other_flags: str = "--out DIR") -> RawTables:
    """Source protocol (see :mod:`mtfm.data.raw`): generate a world for ``schema``.

    ``schema`` None means the packaged ``synthetic.yaml``, or the generated schema of the world
    the keyword knobs describe (``mtfm prepare --num-scenarios --scenario-shares --days
    --valid-days --test-days --history-days --history-max-len --realtime-max-len``; see
    :class:`SyntheticConfig`); the sequence caps, like the split days, may not come with a schema. A given schema may name any
    subset of the generated scenarios and columns (e.g. ``restrict(["SQS"])``), but every table
    and column it names must exist with a compatible dtype; its split is its own, so
    ``valid_days`` / ``test_days`` may not come with it. The returned tables carry
    ``schema.yaml`` (the schema under :func:`world_header`), which ``prepare`` writes beside the
    manifest; its header names the command ``mtfm prepare --source synthetic`` with every knob
    as resolved, followed by ``other_flags``.
    """
    if path is not None:
        raise ValueError(f"synthetic source: generates its data and reads no path, but got path={path!r}; "
                         "to write a world to files use mtfm.data.sources.synthetic.write_parquet")
    knobs = {"num_scenarios": num_scenarios, "scenario_shares": scenario_shares, "days": days,
             "valid_days": valid_days, "test_days": test_days, "history_days": history_days,
             "history_max_len": history_max_len, "realtime_max_len": realtime_max_len}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    own_split = schema is not None  # the schema's split, not the generated one's
    if schema is not None:
        given = [WORLD_FLAGS[k] for k in ("valid_days", "test_days") if k in knobs]
        if given:
            raise ValueError(f"synthetic source: {' and '.join(given)} set the split of the generated schema, but "
                             "--schema brings its own (split.valid_start / test_start); drop one of them")
        caps = [WORLD_FLAGS[k] for k in SCHEMA_KNOBS if k in knobs]
        if caps:
            raise ValueError(f"synthetic source: {' and '.join(caps)} set the sequence caps of the generated schema, "
                             "but --schema brings its own (history / realtime max_len); drop one of them")
        needed = _num_scenarios_for(schema)
        if knobs.get("num_scenarios", needed) < needed:
            raise ValueError(f"synthetic source: --num-scenarios {knobs['num_scenarios']} generates too few scenarios "
                             f"for the schema, which names {schema.scenario_names} (needs {needed})")
        knobs.setdefault("num_scenarios", needed)
    try:
        config = SyntheticConfig(users=DEFAULT_USERS if users is None else users, seed=seed, **knobs)
    except ValidationError as err:
        raise _config_error(err) from None
    if schema is None:
        schema = load_packaged_schema() if config.schema() == synthetic_schema() else config.schema()
    split, clock = schema.split, _Clock.of(config)
    for name, at in (("valid_start", split.valid_start), ("test_start", split.test_start)):
        if at is not None and not clock.start < at < clock.end:
            raise SchemaError(f"synthetic source: split.{name}={at} lies outside the exposure days "
                              f"[{clock.start}, {clock.end}) of the synthetic world (--days {config.days})")
    raw = generate(config)
    check_compatible(schema, raw.tables)
    names = [s.table for s in schema.scenarios] + [q.table for q in (*schema.history, *schema.realtime)]
    tables = {n: raw.tables[n] for n in dict.fromkeys(names)}
    flags = world_flags(config, split=not own_split)
    header = world_header(config, schema, f"mtfm prepare --source synthetic {flags} {other_flags}")
    return RawTables(schema=schema, tables=tables, origins={n: raw.origins[n] for n in tables}, info=raw.info,
                     files={"schema.yaml": schema_yaml(schema, header)})


# --------------------------------------------------------------------------------------------
# Summary and command line
# --------------------------------------------------------------------------------------------


def oracle_summary(raw: RawTables, since: int | None = None) -> pl.DataFrame:
    """Per scenario and task: exposures, label rate, mean oracle probability, oracle AUC/GAUC.

    The oracle scores are the true probabilities, so AUC/GAUC here are the ceiling any model
    can reach on these rows (``since``: only exposures at or after that time, e.g. test_start).
    """
    rows = []
    for s in raw.schema.scenarios:
        df = raw.tables[s.table]
        if since is not None:
            df = df.filter(pl.col(raw.schema.time.column) >= since)
        users = df[raw.schema.user_column].to_numpy()
        for t in s.tasks:
            if t.oracle_column is None:
                continue
            y = np.ones(df.height, dtype=bool)
            for col in t.labels:
                y &= df[col].to_numpy().astype(bool)
            p = df[t.oracle_column].to_numpy()
            rows.append({"scenario": s.name, "task": t.name, "exposures": df.height, "rate": float(y.mean()),
                         "oracle_mean": float(p.mean()), "oracle_auc": auc(y, p),
                         "oracle_gauc": gauc(users, y, p).gauc})
    return pl.DataFrame(rows)


def _shares_arg(text: str) -> tuple[float, ...]:
    """``"0.5,0.3,0.2"`` -> floats (argparse type of ``--scenario-shares``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m mtfm.data.sources.synthetic``: write a world to Parquet, or generate and summarise."""
    parser = argparse.ArgumentParser(prog="python -m mtfm.data.sources.synthetic", description=main.__doc__)
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--valid-days", type=int, default=1)
    parser.add_argument("--test-days", type=int, default=1)
    parser.add_argument("--num-scenarios", type=int, default=3)
    parser.add_argument("--scenario-shares", type=_shares_arg, default=None, metavar="A,B,...",
                        help="relative exposure volume per scenario (normalised); default 8,7,1 (+3 per generic)")
    parser.add_argument("--history-days", type=int, default=14, help="behaviour-only days before the first exposure day")
    parser.add_argument("--history-max-len", type=int, default=HISTORY_MAX_LEN, help="cap of each history type")
    parser.add_argument("--realtime-max-len", type=int, default=REALTIME_MAX_LEN, help="cap of the real-time type")
    parser.add_argument("--block-users", type=int, default=8192)
    parser.add_argument("--out", help="write Parquet here (streamed by chunk) instead of generating in memory")
    parser.add_argument("--users-per-chunk", type=int, default=65_536, help="with --out; multiple of --block-users")
    args = parser.parse_args(argv)
    try:
        cfg = SyntheticConfig(users=args.users, seed=args.seed, days=args.days, num_scenarios=args.num_scenarios,
                              valid_days=args.valid_days, test_days=args.test_days, scenario_shares=args.scenario_shares,
                              history_days=args.history_days, history_max_len=args.history_max_len,
                              realtime_max_len=args.realtime_max_len, block_users=args.block_users)
    except ValidationError as err:
        parser.error(str(err))
    start = time.perf_counter()
    if args.out:
        world = write_parquet(cfg, args.out, args.users_per_chunk, progress=True)
        seconds = time.perf_counter() - start
        exposures = sum(world.rows[d.table] for d in scenario_defs(cfg.num_scenarios))
        summary = pl.DataFrame({"table": list(world.rows), "rows": list(world.rows.values())})
    else:
        raw = generate(cfg)
        seconds = time.perf_counter() - start
        exposures = sum(raw.info["exposures"].values())
        summary = oracle_summary(raw)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4):
        print(summary)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"users={cfg.users} exposures={exposures} generation_seconds={seconds:.1f} "
          f"exposures_per_s={exposures / seconds:,.0f} peak_rss={peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
