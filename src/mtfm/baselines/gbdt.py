"""Gradient-boosted trees (LightGBM) per scenario and task: the baseline many teams run today.

One LightGBM binary classifier per (scenario, task), trained on that scenario's exposures only
(the paper's group 1, per-scenario models), scored with the library's own metric code
(:func:`mtfm.train.evaluate.compute_metrics`) so its AUC / GAUC are exactly comparable with
``mtfm evaluate``'s. LightGBM is an optional extra: ``pip install 'mtfm[gbdt]'``.

**Features of one exposure of scenario ``s``** (:func:`feature_columns` lists them in order;
names are LightGBM-safe, ``[]{}:,"`` become ``_``):

* ``user__F`` / ``cross__F`` / ``item__F``: every user, cross and item feature of ``s`` as
  stored in the prepared data (vectors expanded into their numeric components):

  - categorical ids: a LightGBM *categorical* feature when the feature's cardinality (its
    number of embedding rows) is at most ``max_categorical_cardinality`` (default 1000: small
    vocabularies such as a cuisine or a brand, where a category split is meaningful and the
    per-category statistics are well estimated); above that (hashed restaurant, dish, package
    ids) the id as a plain integer, since a category split over tens of thousands of mostly
    rare ids overfits, and a tree can still carve out ranges;
  - numeric: the stored (already normalised) value as is;
  - multi-categorical (a dish's tags): ``F__len``, the bag's length, and ``F__first``, its
    first id (NaN for an empty bag), categorical or integer by the same cardinality rule.

* behaviour aggregates, per sequence type ``Q`` (``hist_<name>`` for a history type,
  ``rt_<name>`` for a real-time type), computed only from the rows the exposure may see under
  MTFM's dynamic-mask rule (:mod:`mtfm.model.mask`, via
  :func:`mtfm.baselines.common.visible_pairs`): every history row, and a real-time row ``k``
  only when ``t_k < t_q <= expiry_k`` (strictly before the exposure and still among the
  ``max_len`` most recent of its type). So an action at or after the exposure never changes
  its features (no leakage), exactly as for MTFM and the neural baselines:

  - ``Q__count``: how many rows are visible;
  - ``Q__secs_since_last``: seconds from the most recent visible row to the exposure (NaN when
    none is visible). For history types this is the time since the user's last action before
    the window; for real-time types the recency signal a request would have;
  - ``Q__same_G``: for each categorical sequence feature whose ``share`` name is also declared
    by a categorical *item* feature ``G`` of ``s``, the number of visible rows whose value equals
    the exposure's ``G`` (same cuisine, same item id): the tree model's stand-in for target
    attention's content match.

**Training**: the train split's exposures whose task label is observed (``label_mask``);
LightGBM's own early stopping on the valid split's logloss (``early_stopping_rounds`` without
improvement, at most ``num_rounds``), then valid and test scored with the best iteration.
Deterministic for a fixed seed (``deterministic=True``, row-wise histograms, every LightGBM
seed derived from ``seed``; the trees came out identical with 1 and 2 threads). On a busy
shared machine ask for fewer threads (``num_threads``): OpenMP threads competing for cores
made 2 threads ten times slower than 1 on a loaded 2-core VM. A task whose train rows hold a single class, or
with no labelled valid row to stop on, gets a constant prediction (the train positive rate,
0 rounds, no model file) and a warning.

**How this differs from the neural models**: no learned id embeddings (high-cardinality ids
are integers the trees can only split into ranges); behaviour sequences are reduced to the
counts, recencies and match counts above instead of being attended token by token (no
target attention over item ids beyond the exact-match counts, no interactions between
sequence rows); one independent model per scenario *and* task (no sharing across scenarios
and no multi-task sharing such as MMoE); trained on the whole train split at once with
early stopping on valid logloss, not by minibatch SGD with model selection on valid GAUC.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mtfm.baselines.common import visible_pairs
from mtfm.config import (
    CategoricalFeature,
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    SequenceSpec,
)
from mtfm.data.batch import FeatureTensors, JaggedBatch, ScenarioBatch
from mtfm.train.evaluate import Metrics, ScenarioPredictions, compute_metrics, row_user_ids

if TYPE_CHECKING:
    import lightgbm

PARTS = ("user", "cross", "item")
_UNSAFE = re.compile(r'[\[\]{}:,"\s]')


class GBDTConfig(BaseModel):
    """LightGBM settings (the usual production defaults) and the feature rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_leaves: int = Field(63, ge=2)
    learning_rate: float = Field(0.05, gt=0)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    bagging_fraction: float = Field(0.8, gt=0, le=1)
    bagging_freq: int = Field(1, ge=0, description="bag every this many rounds (0: no bagging)")
    min_data_in_leaf: int = Field(100, ge=1)
    num_rounds: int = Field(2000, ge=1, description="at most this many boosting rounds")
    early_stopping_rounds: int = Field(50, ge=1, description="stop after this many rounds without a better valid logloss")
    max_categorical_cardinality: int = Field(
        1000, ge=0, description="ids of a feature with at most this many values are LightGBM categorical, others integers")
    num_threads: int | None = Field(None, ge=1, description="None: torch.get_num_threads()")
    batch_size: int = Field(512, ge=1, description="samples per loader batch while reading features (no effect on results)")


@dataclass
class GBDTResult:
    """What :func:`run_gbdt` measured (metrics as ``mtfm evaluate`` reports them)."""

    valid: Metrics
    test: Metrics
    train_seconds: float  # reading train + valid features and fitting every booster (not test scoring)
    exposures: int  # train exposures with at least one observed label
    best_iterations: dict[str, int]  # "scenario/task" -> boosting rounds kept (0: constant prediction)


@dataclass(frozen=True)
class Column:
    """One feature column: its LightGBM name and whether LightGBM treats it as categorical."""

    name: str
    categorical: bool


@dataclass
class ScenarioFrame:
    """One split's exposures of one scenario: the feature matrix and what metrics need."""

    x: np.ndarray  # float64 [n, columns]
    users: np.ndarray  # int64 [n]
    labels: np.ndarray  # float32 [n, tasks]
    mask: np.ndarray  # bool [n, tasks]
    oracle: np.ndarray  # float32 [n, tasks]

    def predictions(self, probs: np.ndarray) -> ScenarioPredictions:
        return ScenarioPredictions(self.users, self.labels, self.mask, probs.astype(np.float32), self.oracle)


def _lightgbm() -> Any:
    """LightGBM, imported only when a GBDT is trained (an optional extra)."""
    try:
        import lightgbm
    except ImportError as err:
        raise ImportError("the LightGBM baseline needs lightgbm: pip install 'mtfm[gbdt]'") from err
    return lightgbm


def _safe(name: str) -> str:
    """LightGBM refuses JSON-special characters in feature names (a vector's ``v[0]``)."""
    return _UNSAFE.sub("_", name)


def _prefix(spec: SequenceSpec, realtime: bool) -> str:
    return f"{'rt' if realtime else 'hist'}_{_safe(spec.name)}"


def _sequence_types(schema: DataSchema) -> list[tuple[SequenceSpec, bool]]:
    return [(s, False) for s in schema.history] + [(s, True) for s in schema.realtime]


def match_pairs(schema: DataSchema, scenario: str, seq: SequenceSpec) -> list[tuple[str, str]]:
    """``(sequence feature, item feature)`` pairs counted by ``__same_<item feature>``: both
    categorical and declaring the same ``share`` name (so their ids mean the same thing)."""
    spec = next(s for s in schema.scenarios if s.name == scenario)
    items = [f for f in spec.feature_groups["item"] if isinstance(f, CategoricalFeature) and f.share]
    return [(sf.name, it.name) for sf in seq.features if isinstance(sf, CategoricalFeature) and sf.share
            for it in items if it.share == sf.share]


def feature_columns(schema: DataSchema, scenario: str, config: GBDTConfig) -> list[Column]:
    """The columns of scenario ``scenario``'s feature matrix, in order (see the module doc)."""
    spec = next(s for s in schema.scenarios if s.name == scenario)
    limit = config.max_categorical_cardinality
    cols: list[Column] = []
    for part in PARTS:
        for f in spec.feature_groups[part]:
            name = f"{part}__{_safe(f.name)}"
            if isinstance(f, CategoricalFeature):
                cols.append(Column(name, f.cardinality <= limit))
            elif isinstance(f, MultiCategoricalFeature):
                cols += [Column(f"{name}__len", False), Column(f"{name}__first", f.cardinality <= limit)]
            else:
                cols.append(Column(name, False))
    for seq, realtime in _sequence_types(schema):
        prefix = _prefix(seq, realtime)
        cols += [Column(f"{prefix}__count", False), Column(f"{prefix}__secs_since_last", False)]
        cols += [Column(f"{prefix}__same_{_safe(item)}", False) for _, item in match_pairs(schema, scenario, seq)]
    names = [c.name for c in cols]
    if len(set(names)) != len(names):
        raise ValueError(f"scenario {scenario!r}: feature names collide once made LightGBM-safe: {names}")
    return cols


def _part_columns(spec_features: list[Feature], ft: FeatureTensors, n: int) -> list[np.ndarray]:
    """The stored user / cross / item features of one part, one array per column."""
    out: list[np.ndarray] = []
    for f in spec_features:
        if isinstance(f, CategoricalFeature):
            out.append(ft.categorical[f.name].numpy().astype(np.float64))
        elif isinstance(f, MultiCategoricalFeature):
            values, offsets = ft.multi[f.name]
            lengths = (offsets[1:] - offsets[:-1]).numpy()
            first = np.full(n, np.nan)
            has = lengths > 0
            first[has] = values.numpy()[offsets[:-1].numpy()[has]]
            out += [lengths.astype(np.float64), first]
        else:
            assert isinstance(f, NumericFeature)
            out.append(ft.numeric[f.name].numpy().astype(np.float64))
    return out


def history_aggregates(batch: JaggedBatch, schema: DataSchema, scenario: str) -> list[np.ndarray]:
    """Per sequence type: visible count, seconds since the last visible row, match counts
    (columns in :func:`feature_columns` order), each from the rows the exposure may see."""
    sc = batch.scenarios[scenario]
    n = sc.num_rows
    per_second = schema.time.per_second
    out: list[np.ndarray] = []
    for spec, realtime in _sequence_types(schema):
        seq = (batch.realtime if realtime else batch.history)[spec.name]
        q, k = visible_pairs(sc, seq, realtime)
        count = torch.bincount(q, minlength=n)
        last = torch.full((n,), torch.iinfo(torch.long).min, dtype=torch.long)
        last = last.scatter_reduce(0, q, seq.timestamps[k], reduce="amax", include_self=True)
        seen = count > 0
        secs = ((sc.timestamps - torch.where(seen, last, sc.timestamps)).double() / per_second).numpy()
        secs[~seen.numpy()] = np.nan
        out += [count.numpy().astype(np.float64), secs]
        for seq_feature, item_feature in match_pairs(schema, scenario, spec):
            same = seq.features.categorical[seq_feature][k] == sc.item.categorical[item_feature][q]
            out.append(torch.bincount(q[same], minlength=n).numpy().astype(np.float64))
    return out


def scenario_features(batch: JaggedBatch, schema: DataSchema, scenario: str) -> np.ndarray:
    """``[n_s, columns]`` feature matrix of scenario ``scenario``'s exposures in ``batch``."""
    spec = next(s for s in schema.scenarios if s.name == scenario)
    sc: ScenarioBatch = batch.scenarios[scenario]
    n = sc.num_rows
    cols: list[np.ndarray] = []
    for part in PARTS:
        cols += _part_columns(spec.feature_groups[part], getattr(sc, part), n)
    cols += history_aggregates(batch, schema, scenario)
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def read_split(data_dir: str | Path, split: str, config: GBDTConfig) -> tuple[DataSchema, dict[str, ScenarioFrame]]:
    """Every scenario's feature frame of ``split``, read by the library's loader in stored order."""
    from mtfm.data.loader import BatchLoader

    loader = BatchLoader(data_dir, split, config.batch_size, shuffle=False, seed=0)
    schema = loader.schema
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {s: [] for s in schema.scenario_names}
    for batch in loader.iterate(0):
        for name, sc in batch.scenarios.items():
            if sc.num_rows == 0:
                continue
            parts[name].append((scenario_features(batch, schema, name),
                                row_user_ids(batch, sc.offsets).numpy().astype(np.int64),
                                sc.labels.float().numpy(), sc.label_mask.bool().numpy(), sc.oracle.float().numpy()))
    frames = {}
    for spec in schema.scenarios:
        width = len(feature_columns(schema, spec.name, config))
        tasks = len(spec.tasks)
        if parts[spec.name]:
            frames[spec.name] = ScenarioFrame(*(np.concatenate(a) for a in zip(*parts[spec.name])))
        else:
            empty = np.zeros((0, tasks), np.float32)
            frames[spec.name] = ScenarioFrame(np.zeros((0, width)), np.zeros(0, np.int64), empty,
                                              empty.astype(bool), empty)
    return schema, frames


def lightgbm_params(config: GBDTConfig, seed: int) -> dict[str, Any]:
    """The booster parameters: binary logloss, the config's tree settings, reproducible runs."""
    return {
        "objective": "binary", "metric": "binary_logloss", "num_leaves": config.num_leaves,
        "learning_rate": config.learning_rate, "feature_fraction": config.feature_fraction,
        "bagging_fraction": config.bagging_fraction, "bagging_freq": config.bagging_freq,
        "min_data_in_leaf": config.min_data_in_leaf,
        "num_threads": config.num_threads or torch.get_num_threads(),
        "seed": seed, "deterministic": True, "force_row_wise": True, "verbosity": -1,
    }


@dataclass
class TaskModel:
    """One (scenario, task) model: a booster at its best iteration, or a constant."""

    booster: "lightgbm.Booster | None"
    best_iteration: int
    constant: float = 0.5

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.booster is None:
            return np.full(x.shape[0], self.constant)
        return self.booster.predict(x, num_iteration=self.best_iteration)


def train_task(train: ScenarioFrame, valid: ScenarioFrame, task: int, columns: list[Column],
               config: GBDTConfig, seed: int, where: str) -> TaskModel:
    """Fit one booster on the labelled train rows, early-stopped on the labelled valid rows."""
    lgb = _lightgbm()
    rows, vrows = train.mask[:, task], valid.mask[:, task]
    y, vy = train.labels[rows, task], valid.labels[vrows, task]
    if y.size == 0 or y.min() == y.max() or vy.size == 0:
        rate = float(y.mean()) if y.size else 0.5
        warnings.warn(f"{where}: {y.size} labelled train rows ({int(y.sum())} positive), {vy.size} valid rows; "
                      f"nothing to boost or stop on, predicting the constant {rate:.4g}", stacklevel=2)
        return TaskModel(None, 0, rate)
    names = [c.name for c in columns]
    cats = [c.name for c in columns if c.categorical]
    dtrain = lgb.Dataset(train.x[rows], label=y, feature_name=names, categorical_feature=cats, free_raw_data=True)
    dvalid = lgb.Dataset(valid.x[vrows], label=vy, reference=dtrain)
    booster = lgb.train(lightgbm_params(config, seed), dtrain, num_boost_round=config.num_rounds,
                        valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)])
    best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
    return TaskModel(booster, best)


def _score(frame: ScenarioFrame, models: list[TaskModel]) -> ScenarioPredictions:
    probs = np.stack([m.predict(frame.x) for m in models], axis=1) if frame.x.shape[0] else frame.labels.copy()
    return frame.predictions(probs)


def _save(out: Path, result: GBDTResult, models: dict[str, list[TaskModel]], schema: DataSchema,
          columns: dict[str, list[Column]], config: GBDTConfig, seed: int) -> None:
    """Each booster as LightGBM text (its best iteration) and metrics.json (written last, atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    for spec in schema.scenarios:
        for task, model in zip(spec.task_names, models[spec.name]):
            if model.booster is not None:
                model.booster.save_model(str(out / f"model_{spec.name}_{task}.txt"), num_iteration=model.best_iteration)
    doc = {"model": "lightgbm", "seed": seed, "config": config.model_dump(mode="json"),
           "valid": result.valid, "test": result.test,
           "train_seconds": result.train_seconds, "exposures": result.exposures,
           "best_iterations": result.best_iterations,
           "constant_tasks": {f"{spec.name}/{t}": m.constant for spec in schema.scenarios
                              for t, m in zip(spec.task_names, models[spec.name]) if m.booster is None},
           "features": {s: [{"name": c.name, "categorical": c.categorical} for c in cols] for s, cols in columns.items()}}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "metrics.json")


def run_gbdt(data_dir: str | Path, config: GBDTConfig, seed: int, out_dir: str | Path | None = None) -> GBDTResult:
    """Train one LightGBM model per (scenario, task) of a prepared directory; valid and test metrics.

    ``out_dir``: where to save ``model_<scenario>_<task>.txt`` and ``metrics.json`` (None: nothing saved).
    """
    _lightgbm()  # fail before reading any data when the extra is missing
    start = time.perf_counter()
    schema, train = read_split(data_dir, "train", config)
    _, valid = read_split(data_dir, "valid", config)
    columns = {s.name: feature_columns(schema, s.name, config) for s in schema.scenarios}
    models: dict[str, list[TaskModel]] = {}
    for spec in schema.scenarios:
        models[spec.name] = [train_task(train[spec.name], valid[spec.name], t, columns[spec.name], config, seed,
                                        f"{spec.name}/{task}") for t, task in enumerate(spec.task_names)]
    train_seconds = time.perf_counter() - start
    _, test = read_split(data_dir, "test", config)
    tasks = {s.name: s.task_names for s in schema.scenarios}
    result = GBDTResult(
        valid=compute_metrics({s: _score(valid[s], models[s]) for s in tasks}, tasks),
        test=compute_metrics({s: _score(test[s], models[s]) for s in tasks}, tasks),
        train_seconds=train_seconds,
        exposures=int(sum(f.mask.any(axis=1).sum() for f in train.values())),
        best_iterations={f"{s}/{t}": m.best_iteration for s in tasks for t, m in zip(tasks[s], models[s])},
    )
    if out_dir is not None:
        _save(Path(out_dir), result, models, schema, columns, config, seed)
    return result
