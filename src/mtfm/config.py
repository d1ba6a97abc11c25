"""Typed, validated configuration: the data schema (what the raw logs look like).

A schema is written in YAML and validated with pydantic before any work starts. Every error
names the file and the dotted field path (for example
``schema.yaml: scenarios[HP].tasks.1.labels: ...``) so a user can fix it without reading code.

The schema is the contract between the raw logs and everything downstream:

* each *scenario* has its own exposure table and its own user / cross / item feature lists and
  tasks. Nothing is aligned between scenarios (paper, section 3.1);
* *history* sequence types (H) and *real-time* sequence types (R) are shared by all scenarios,
  each read from its own behaviour table with its own features;
* time column and unit, the aggregation window and the time-based split.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtfm.errors import UnknownNameError
from mtfm.yamlio import safe_load

# Kinds of input an ablation can leave out (DataSchema.without).
INPUT_KINDS: tuple[str, ...] = ("history", "realtime", "cross")


class SchemaError(ValueError):
    """A schema (YAML or in-memory) that does not validate; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


class _IdEncoding(_Strict):
    """How raw values of a categorical column become embedding ids.

    Exactly one of:
    * ``num_embeddings``: the column already holds integer ids in ``[0, num_embeddings)``;
      a value outside that range is an error (never silently clipped).
    * ``vocabulary``: explicit list of raw values; id = position + 1, id 0 = out of vocabulary.
      ``vocabulary: train`` asks ``mtfm prepare`` to build that list from the train split's
      values (most frequent first, ties by value; ``vocabulary_min_count`` /
      ``vocabulary_max_size`` prune it) and to write it into the prepared data's schema, so
      training, evaluation and serving read the same list (:mod:`mtfm.data.vocab`).
    * ``hash_buckets``: any value is hashed into ``[0, hash_buckets)``.

    ``share``: features declaring the same share name read one embedding table (their encodings
    must then agree); a feature without ``share`` gets a table of its own (:mod:`mtfm.sharing`).
    """

    num_embeddings: int | None = Field(default=None, gt=0)
    vocabulary: list[str | int] | Literal["train"] | None = None
    vocabulary_min_count: int | None = Field(
        default=None, ge=1, description="vocabulary: train only: values seen fewer times in train are OOV (default 1)"
    )
    vocabulary_max_size: int | None = Field(
        default=None, gt=0, description="vocabulary: train only: keep at most this many values, the most frequent"
    )
    hash_buckets: int | None = Field(default=None, gt=0)
    embedding_dim: int | None = Field(default=None, gt=0, description="None: the model default")
    share: str | None = Field(
        default=None, min_length=1, description="share name: features with the same one read one embedding table"
    )

    @model_validator(mode="after")
    def _exactly_one_encoding(self) -> "_IdEncoding":
        given = [k for k in ("num_embeddings", "vocabulary", "hash_buckets") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of num_embeddings, vocabulary, hash_buckets must be set "
                f"(got {given or 'none'})"
            )
        if isinstance(self.vocabulary, list):
            if len(self.vocabulary) == 0:
                raise ValueError("vocabulary must not be empty")
            if len(set(map(str, self.vocabulary))) != len(self.vocabulary):
                raise ValueError("vocabulary has duplicate values")
        pruning = [k for k in ("vocabulary_min_count", "vocabulary_max_size") if getattr(self, k) is not None]
        if pruning and self.vocabulary != "train":
            raise ValueError(f"{' and '.join(pruning)} only apply to 'vocabulary: train'")
        return self

    @property
    def train_vocabulary(self) -> bool:
        """True while the vocabulary is still to be built from the train split (``vocabulary: train``)."""
        return self.vocabulary == "train"

    @property
    def cardinality(self) -> int:
        """Number of embedding rows the encoded ids need."""
        if self.num_embeddings is not None:
            return self.num_embeddings
        if self.vocabulary == "train":
            raise SchemaError(
                f"feature {getattr(self, 'name', '?')!r}: 'vocabulary: train' is built by mtfm prepare; "
                "use the prepared data's schema (manifest.json), which holds the built vocabulary"
            )
        if self.vocabulary is not None:
            return len(self.vocabulary) + 1
        assert self.hash_buckets is not None
        return self.hash_buckets

    def encoding_key(self) -> dict[str, object]:
        """What two features sharing one table must agree on (see :meth:`DataSchema._shares_agree`)."""
        return {"num_embeddings": self.num_embeddings, "vocabulary": self.vocabulary,
                "vocabulary_min_count": self.vocabulary_min_count, "vocabulary_max_size": self.vocabulary_max_size,
                "hash_buckets": self.hash_buckets, "embedding_dim": self.embedding_dim}


class CategoricalFeature(_IdEncoding):
    kind: Literal["categorical"] = "categorical"
    name: str = Field(min_length=1, description="column in the raw table")


class MultiCategoricalFeature(_IdEncoding):
    """A list-valued column (e.g. a dish's tags); pooled into one embedding by the model."""

    kind: Literal["multi_categorical"] = "multi_categorical"
    name: str = Field(min_length=1)
    max_len: int = Field(default=16, gt=0, description="longer lists keep their first max_len values")
    pooling: Literal["mean", "sum"] = "mean"


class NumericFeature(_Strict):
    """A numeric column, normalised at prepare time.

    ``standard`` and ``minmax`` statistics are computed on the *train* split only and written
    to the manifest, so valid/test rows never leak into them.
    """

    kind: Literal["numeric"] = "numeric"
    name: str = Field(min_length=1)
    normalization: Literal["none", "log1p", "standard", "minmax"] = "standard"
    clip: tuple[float, float] | None = Field(default=None, description="clip raw values before normalising")

    @model_validator(mode="after")
    def _clip_ordered(self) -> "NumericFeature":
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip must be (low, high) with low < high, got {self.clip}")
        return self


Feature = Annotated[
    Union[CategoricalFeature, MultiCategoricalFeature, NumericFeature], Field(discriminator="kind")
]


class VectorFeature(_Strict):
    """A fixed-length list of numbers in one column (an affinity vector, a pretrained embedding).

    Declared once instead of ``dim`` numeric features; prepare checks every row holds exactly
    ``dim`` finite numbers and stores component ``i`` as the numeric feature ``name[i]``
    (each normalised as ``normalization`` says, statistics per component from the train
    split), so the model sees ``dim`` numeric inputs. In CSV the values are joined by ``|``.
    Scenario features only (user, cross, item).
    """

    kind: Literal["vector"] = "vector"
    name: str = Field(min_length=1)
    dim: int = Field(gt=0, le=4096)
    normalization: Literal["none", "log1p", "standard", "minmax"] = "standard"

    def components(self) -> list[NumericFeature]:
        """The numeric features prepare stores, one per position."""
        return [NumericFeature(name=f"{self.name}[{i}]", normalization=self.normalization) for i in range(self.dim)]


class VectorEntryFeature(_Strict):
    """One number per row: entry ``index`` (an integer column, 0-based) of the list column
    ``vector`` -- "the affinity of the user to the shown item" when ``vector`` holds one value
    per item and ``index`` is the item's position. Stored as the numeric feature ``name``; an
    index outside the row's vector is an error naming the row. Scenario features only."""

    kind: Literal["vector_entry"] = "vector_entry"
    name: str = Field(min_length=1, description="name of the derived numeric feature")
    vector: str = Field(min_length=1, description="list column holding the vector")
    index: str = Field(min_length=1, description="integer column: position in the vector, 0-based")
    normalization: Literal["none", "log1p", "standard", "minmax"] = "standard"

    def as_numeric(self) -> NumericFeature:
        return NumericFeature(name=self.name, normalization=self.normalization)


ScenarioFeature = Annotated[
    Union[CategoricalFeature, MultiCategoricalFeature, NumericFeature, VectorFeature, VectorEntryFeature],
    Field(discriminator="kind"),
]


def expand_features(features: Sequence[object]) -> list[Feature]:
    """Scenario features as stored and modelled: a vector becomes its components, a vector
    entry its numeric feature; the others are themselves."""
    out: list[Feature] = []
    for f in features:
        if isinstance(f, VectorFeature):
            out += f.components()
        elif isinstance(f, VectorEntryFeature):
            out.append(f.as_numeric())
        else:
            out.append(f)  # type: ignore[arg-type]
    return out


def _unique_feature_names(features: list[Feature], where: str) -> list[Feature]:
    names = [f.name for f in features]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate feature names in {where}: {dupes}")
    return features


# --------------------------------------------------------------------------------------------
# Scenarios, tasks, sequences
# --------------------------------------------------------------------------------------------


class TaskSpec(_Strict):
    """One prediction task of a scenario.

    The label is the AND of ``labels`` (CTCVR = [click, conversion]). Each label column must
    hold 0/1. ``allow_missing``: a null label means "not observed" and masks the task for that
    exposure instead of being an error. ``oracle_column``: the true probability, when the source
    knows it (synthetic data), used for the oracle AUC/GAUC ceiling.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$")
    labels: list[str] = Field(min_length=1)
    allow_missing: bool = False
    oracle_column: str | None = None


class SideTable(_Strict):
    """A feature table joined onto an exposure or behaviour table by a key column.

    Every feature column the reading table lacks and the side table has is taken from the
    side table's row with the same ``key`` (a column of both tables). The key must be unique
    in the side table, and every key of the reading table must be found there; both are
    errors naming the row otherwise (a silent null or a duplicated exposure is never made).
    """

    table: str = Field(min_length=1)
    key: str = Field(min_length=1, description="join column, present in both tables")


class ScenarioSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$")
    table: str = Field(min_length=1, description="exposure table of this scenario")
    user_table: SideTable | None = Field(default=None, description="user features joined by key")
    item_table: SideTable | None = Field(default=None, description="item features joined by key")
    user_features: list[ScenarioFeature] = Field(default_factory=list)
    cross_features: list[ScenarioFeature] = Field(default_factory=list)
    item_features: list[ScenarioFeature] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> "ScenarioSpec":
        all_features = [*self.user_features, *self.cross_features, *self.item_features]
        _unique_feature_names(all_features, "user/cross/item features")  # type: ignore[arg-type]
        _unique_feature_names(expand_features(all_features), "user/cross/item features (vectors expanded)")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"duplicate task names: {task_names}")
        return self

    @property
    def feature_groups(self) -> dict[str, list[Feature]]:
        """Features per group as stored and modelled (vectors expanded, :func:`expand_features`)."""
        return {"user": expand_features(self.user_features), "cross": expand_features(self.cross_features),
                "item": expand_features(self.item_features)}

    @property
    def declared_groups(self) -> dict[str, list[ScenarioFeature]]:
        """Features per group as the schema declares them (what the raw tables hold)."""
        return {"user": list(self.user_features), "cross": list(self.cross_features), "item": list(self.item_features)}

    def vector_features(self) -> list[VectorFeature | VectorEntryFeature]:
        """The vector and vector-entry features, which prepare derives columns for."""
        return [f for g in self.declared_groups.values() for f in g
                if isinstance(f, (VectorFeature, VectorEntryFeature))]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


class SequenceSpec(_Strict):
    """A shared behaviour sequence type, read from its own behaviour table.

    History (H) keeps the most recent ``max_len`` actions strictly before the window start.
    Real-time (R) gives every token the ``max_len`` most recent actions strictly before its own
    timestamp, what a request at that moment would see: a sample stores the ``max_len``
    actions before the window start plus every action inside the window, and the model's
    dynamic mask picks each token's own view (:mod:`mtfm.model.mask`).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$")
    table: str = Field(min_length=1)
    item_table: SideTable | None = Field(default=None, description="features of the actions' items, joined by key")
    features: list[Feature] = Field(min_length=1)
    max_len: int = Field(gt=0)
    max_in_window: int | None = Field(
        default=None,
        gt=0,
        description="real-time only: store at most this many of a sample's in-window actions (the "
        "earliest; later exposures then miss the rest, never future ones). The actions left out are "
        "counted per type in manifest.json 'realtime_truncated' and printed by prepare. None: all",
    )

    @field_validator("features")
    @classmethod
    def _features_unique(cls, v: list[Feature]) -> list[Feature]:
        return _unique_feature_names(v, "features")


class TimeSpec(_Strict):
    column: str = "ts"
    unit: Literal["s", "ms", "us", "ns"] = Field(
        default="s", description="unit of integer timestamps; datetime and ISO-8601 input is converted to it"
    )
    min: int | None = Field(default=None, description="exposures before this are dropped (counted)")
    max: int | None = Field(default=None, description="exposures at or after this are dropped (counted)")

    @property
    def per_second(self) -> int:
        return PER_SECOND[self.unit]


class SplitSpec(_Strict):
    """Time-based split by window start.

    Either absolute boundaries (``valid_start``, ``test_start``, in the time unit) or
    fractions of the windows (the last ``test_fraction`` of distinct windows is test, the
    ``valid_fraction`` before it valid). The boundaries actually used go into the manifest.
    """

    valid_start: int | None = None
    test_start: int | None = None
    valid_fraction: float | None = Field(default=None, ge=0, lt=1)
    test_fraction: float | None = Field(default=None, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_style(self) -> "SplitSpec":
        absolute = self.valid_start is not None or self.test_start is not None
        fraction = self.valid_fraction is not None or self.test_fraction is not None
        if absolute == fraction:
            raise ValueError("give either valid_start/test_start or valid_fraction/test_fraction")
        if absolute and (self.valid_start is None or self.test_start is None or self.valid_start > self.test_start):
            raise ValueError("valid_start and test_start are both required, with valid_start <= test_start")
        if fraction and ((self.valid_fraction or 0) + (self.test_fraction or 0) >= 1):
            raise ValueError("valid_fraction + test_fraction must be < 1")
        return self


PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _instant_to_unit(value: object, unit: str) -> object:
    """An ISO-8601 text or YAML datetime/date -> integer epoch in ``unit`` (an offset is
    honoured, none means UTC); anything else is returned for the field's own validation."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        return value
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)
    delta = aware - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta // dt.timedelta(microseconds=1)) * PER_SECOND[unit] // 1_000_000


class DataSchema(_Strict):
    """The whole schema. ``time.min``/``time.max`` and ``split.valid_start``/``test_start``
    may be written as dates or ISO-8601 times (``2024-05-01T00:00:00+02:00``); they are
    converted to integers in ``time.unit`` when the schema is read."""

    user_column: str = "user_id"
    time: TimeSpec = Field(default_factory=TimeSpec)
    window: int = Field(gt=0, description="aggregation window length, in the time unit")
    split: SplitSpec
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    history: list[SequenceSpec] = Field(default_factory=list)
    realtime: list[SequenceSpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _instants_to_unit(cls, data: object) -> object:
        """Dates and ISO times among the time bounds -> integers in the unit (see the class)."""
        if not isinstance(data, dict):
            return data
        time, split = data.get("time"), data.get("split")
        unit = time.get("unit", "s") if isinstance(time, dict) else "s"
        if unit not in PER_SECOND:
            return data
        data = dict(data)
        if isinstance(time, dict):
            data["time"] = {k: _instant_to_unit(v, unit) if k in ("min", "max") else v for k, v in time.items()}
        if isinstance(split, dict):
            data["split"] = {k: _instant_to_unit(v, unit) if k in ("valid_start", "test_start") else v
                             for k, v in split.items()}
        return data

    @model_validator(mode="after")
    def _names_unique(self) -> "DataSchema":
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate scenario names: {names}")
        seq = [s.name for s in (*self.history, *self.realtime)]
        if len(set(seq)) != len(seq):
            raise ValueError(f"duplicate sequence names across history and realtime: {seq}")
        main = {s.table for s in self.scenarios} | {s.table for s in (*self.history, *self.realtime)}
        both = sorted(main & set(self.side_tables()))
        if both:
            raise ValueError(f"table(s) {both} are used both as side tables and as exposure/behaviour tables")
        capped = [h.name for h in self.history if h.max_in_window is not None]
        if capped:
            raise ValueError(f"history[{capped[0]}].max_in_window: only real-time sequences store in-window actions")
        return self

    @model_validator(mode="after")
    def _shares_agree(self) -> "DataSchema":
        """Features declaring one ``share`` name read one table: their encodings must agree."""
        first: dict[str, tuple[str, _IdEncoding]] = {}
        for path, _, feat in self.id_features():
            if feat.share is None:
                continue
            if feat.share not in first:
                first[feat.share] = (path, feat)
                continue
            path0, feat0 = first[feat.share]
            a, b = feat0.encoding_key(), feat.encoding_key()
            diff = [k for k in a if a[k] != b[k]]
            if diff:
                def show(v: object) -> str:
                    return f"a list of {len(v)} values" if isinstance(v, list) and len(v) > 8 else repr(v)
                what = "; ".join(f"{k} {show(a[k])} vs {show(b[k])}" for k in diff)
                raise ValueError(
                    f"share {feat.share!r}: {path0} and {path} read one embedding table but differ in {what}; "
                    "give them the same encoding, or different share names"
                )
        return self

    # ---- helpers used by every stage ------------------------------------------------------

    @property
    def scenario_names(self) -> list[str]:
        return [s.name for s in self.scenarios]

    def side_tables(self) -> dict[str, list[SideTable]]:
        """Side table name -> its uses (user/item tables of scenarios and sequences), in order."""
        out: dict[str, list[SideTable]] = {}
        for spec in (*self.scenarios, *self.history, *self.realtime):
            for side in (getattr(spec, "user_table", None), spec.item_table):
                if side is not None:
                    out.setdefault(side.table, []).append(side)
        return out

    def id_features(self) -> list[tuple[str, str, "CategoricalFeature | MultiCategoricalFeature"]]:
        """Every categorical and multi-categorical feature as (schema path, model field, feature),
        in model order: history types, real-time types, then each scenario's user, cross, item
        features. The path names it in the YAML (``scenarios[HP].item_features[item_id]``); the
        field is the model's (``H:clicks``, ``T:HP:item``; :mod:`mtfm.model.embedding`)."""
        out: list[tuple[str, str, CategoricalFeature | MultiCategoricalFeature]] = []
        for kind, field, specs in (("history", "H", self.history), ("realtime", "R", self.realtime)):
            for seq in specs:
                out += [(f"{kind}[{seq.name}].features[{f.name}]", f"{field}:{seq.name}", f) for f in seq.features
                        if isinstance(f, (CategoricalFeature, MultiCategoricalFeature))]
        for sc in self.scenarios:
            for part, features in sc.declared_groups.items():
                out += [(f"scenarios[{sc.name}].{part}_features[{f.name}]", f"T:{sc.name}:{part}", f) for f in features
                        if isinstance(f, (CategoricalFeature, MultiCategoricalFeature))]
        return out

    def scenario(self, name: str) -> ScenarioSpec:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise UnknownNameError(f"unknown scenario {name!r}; the schema has {self.scenario_names}")

    def token_groups(self) -> list[str]:
        """Group LayerNorm groups, in a fixed order: history types, real-time types, scenarios.

        The position in this list is the group id carried by ``TokenLayout.group_ids``.
        """
        return (
            [f"H:{s.name}" for s in self.history]
            + [f"R:{s.name}" for s in self.realtime]
            + [f"T:{s.name}" for s in self.scenarios]
        )

    def restrict(self, scenario_names: list[str]) -> "DataSchema":
        """The same schema with only the named scenarios (for single-scenario training)."""
        unknown = [n for n in scenario_names if n not in self.scenario_names]
        if unknown:
            raise SchemaError(f"unknown scenario(s) {unknown}; the schema has {self.scenario_names}")
        kept = [s for s in self.scenarios if s.name in scenario_names]
        return self.model_copy(update={"scenarios": kept})

    def without(self, inputs: Sequence[str]) -> "DataSchema":
        """The same schema without some kinds of input (``INPUT_KINDS``), for input ablations:
        ``history`` drops every H sequence, ``realtime`` every R sequence, ``cross`` every
        scenario's cross features. The loader then reads none of their columns and the model
        built from the result has no tokens or features for them."""
        unknown = [k for k in inputs if k not in INPUT_KINDS]
        if unknown:
            raise SchemaError(f"unknown input kind(s) {unknown}; expected some of {list(INPUT_KINDS)}")
        update: dict = {}
        if "history" in inputs:
            update["history"] = []
        if "realtime" in inputs:
            update["realtime"] = []
        if "cross" in inputs:
            update["scenarios"] = [s.model_copy(update={"cross_features": []}) for s in self.scenarios]
        return self.model_copy(update=update)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str, raw: object) -> str:
    lines = [f"{source}: invalid schema ({err.error_count()} problem(s))"]
    for e in err.errors():
        path = _readable_path(e["loc"], raw)
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def _readable_path(loc: tuple, raw: object) -> str:
    """Dotted path; list items of named things show their name: scenarios[HP].tasks[ctr]."""
    parts: list[str] = []
    node = raw
    for key in loc:
        if isinstance(key, int) and isinstance(node, list):
            item = node[key] if key < len(node) else None
            name = item.get("name") if isinstance(item, dict) else None
            label = f"[{name if name is not None else key}]"
            if parts:
                parts[-1] += label
            else:
                parts.append(label)
            node = item
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(p for p in parts if p) or "<root>"


def schema_from_dict(raw: object, source: str = "<schema>") -> DataSchema:
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as err:
        raise SchemaError(_format_validation_error(err, source, raw)) from None


def load_schema(path: str | Path) -> DataSchema:
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found")
    try:
        raw = safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SchemaError(f"{path}: not valid YAML: {err}") from None
    return schema_from_dict(raw, str(path))


def dump_schema(schema: DataSchema, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(schema.model_dump(mode="json"), sort_keys=False))
