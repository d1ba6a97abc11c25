"""Request scoring for the HTTP service, independent of the web framework.

A :class:`Scorer` holds a trained run's models (each scenario from its own best checkpoint, as
``mtfm predict`` scores it), the prepared data's manifest (its encoding statistics), the
behaviour store and an optional prefix cache. :meth:`Scorer.score` turns one request (one user,
one scenario, candidates as JSON objects) into per-task probabilities through the training
feature code (:func:`mtfm.data.aggregate.build_request`) and M-Falcon
(:func:`mtfm.serve.falcon.score_candidates`) over the user's prefix, cached per user and
checkpoint with the version ``(window id, the user's store version)``: an append to the user's
behaviour (:meth:`Scorer.append_actions`) bumps the version and invalidates the entry at once.
Requests with inline behaviour bypass the cache (their behaviour is not the store's).

Every problem with a request raises :class:`mtfm.data.validate.DataError` (a ``ValueError``)
whose message starts with the request field, e.g. ``candidates[2].cuisine: ...``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from mtfm.config import DataSchema
from mtfm.data.store import Manifest, data_fingerprint, read_manifest
from mtfm.data.validate import DataError, sequence_tables
from mtfm.serve.falcon import compute_prefix, score_candidates
from mtfm.serve.prefix_cache import PrefixCache
from mtfm.serve.store import BehaviourStore, actions_frame, typed_column

UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass
class ScenarioModel:
    """The model that scores one scenario, and the manifest view its requests are built with
    (the model's own schema: an input-ablation run has no H or R)."""

    model: torch.nn.Module
    checkpoint: Path
    manifest: Manifest
    tasks: list[str]
    version: str


@dataclass
class ScoreResult:
    scores: dict[str, list[float]]  # task -> probability per candidate, in request order
    model_version: str
    prefix_cache: str  # "hit", "miss" or "off"
    prefix_seconds: float  # time spent computing the prefix (0 on a hit)


@dataclass
class ScorerStats:
    """Counters the service's /metrics reads: prefix computations and their total time."""

    prefix_computed: int = 0
    prefix_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def mean_prefix_seconds(self) -> float:
        return self.prefix_seconds / self.prefix_computed if self.prefix_computed else 0.0


def load_models(run_dir: str | Path, data_dir: str | Path, checkpoint: str = "best",
                allow_other_data: bool = False) -> dict[str, ScenarioModel]:
    """Each scenario's model of the run (one load per distinct checkpoint), checked against the data."""
    from mtfm.train.evaluate import scenario_checkpoints
    from mtfm.train.models import model_from_checkpoint
    from mtfm.train.rundata import check_checkpoint_data

    manifest = read_manifest(data_dir)
    chosen = scenario_checkpoints(run_dir, checkpoint)
    loaded: dict[Path, tuple[torch.nn.Module, Manifest]] = {}
    out = {}
    for scenario, ckpt in chosen.items():
        if ckpt not in loaded:
            check_checkpoint_data(ckpt, data_dir, action="serve", allow_other_data=allow_other_data)
            model, _, schema = model_from_checkpoint(ckpt)
            seen = manifest.model_copy(update={"data_schema": schema.model_dump(mode="json", exclude_none=True),
                                               "scenarios_prepared": schema.scenario_names})
            loaded[ckpt] = (model.eval(), seen)
        model, seen = loaded[ckpt]
        tasks = seen.schema_obj.scenario(scenario).task_names
        out[scenario] = ScenarioModel(model, ckpt, seen, tasks, f"{Path(run_dir).resolve().name}/{ckpt.name}")
    return out


class Scorer:
    """Scores requests of one run against the behaviour store (see the module docstring)."""

    def __init__(self, models: Mapping[str, ScenarioModel], store: BehaviourStore, cache: PrefixCache | None,
                 request_columns: Mapping[str, Mapping[str, pl.DataType]], micro_batch: int | None = 256) -> None:
        self.models, self.store, self.cache = dict(models), store, cache
        self.request_columns = {s: dict(c) for s, c in request_columns.items()}
        self.micro_batch = micro_batch
        self.stats = ScorerStats()
        first = next(iter(self.models.values()))
        self.schema: DataSchema = first.manifest.schema_obj

    @property
    def scenarios(self) -> list[str]:
        return list(self.models)

    def _scenario(self, scenario: str) -> ScenarioModel:
        if scenario not in self.models:
            raise DataError(f"scenario: unknown scenario {scenario!r}; this service scores {self.scenarios}")
        return self.models[scenario]

    def request_time(self, timestamp: int | None) -> int:
        """The request's time in the schema's unit (now when not given)."""
        if timestamp is not None:
            return timestamp
        return int(time.time() * UNIT_PER_SECOND[self.schema.time.unit])

    def candidates_frame(self, scenario: str, user: int, candidates: Sequence[Mapping[str, Any]],
                         user_features: Mapping[str, Any]) -> pl.DataFrame:
        """Candidates as the scenario's exposure rows with the source's dtypes; the scenario's user
        features come from ``user_features`` unless a candidate gives its own."""
        cols = self.request_columns[scenario]
        tcol = self.schema.time.column
        unknown = [k for k in user_features if k not in cols]
        if unknown:
            raise DataError(f"user_features: unknown feature(s) {unknown}; scenario {scenario} has {list(cols)}")
        rows = [{**user_features, **c} for c in candidates]
        allowed = {**cols, tcol: pl.Int64()}
        for i, row in enumerate(rows):
            extra = [k for k in row if k not in allowed]
            if extra:
                raise DataError(f"candidates[{i}]: unknown column(s) {extra}; scenario {scenario} takes {list(allowed)}")
            missing = [k for k in cols if k not in row]
            if missing:
                raise DataError(f"candidates[{i}]: missing feature(s) {missing}")
        data = {c: typed_column(c, [r[c] for r in rows], d, "candidates") for c, d in cols.items()}
        timed = [r.get(tcol) for r in rows]
        if any(t is not None for t in timed):
            if any(t is None for t in timed):
                raise DataError(f"candidates[{timed.index(None)}].{tcol}: give a timestamp to every candidate or none")
            data[tcol] = typed_column(tcol, timed, pl.Int64(), "candidates")
        return pl.DataFrame(data)

    def behaviour_tables(self, user: int, request_time: int,
                         inline: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> dict[str, pl.DataFrame]:
        """The user's behaviour rows up to the end of the request's window: from the store, or
        the request's own (``inline``; tables it leaves out are empty)."""
        window = self.schema.window
        end = (request_time // window + 1) * window
        if inline is None:
            return self.store.user_rows(user, before=end)
        unknown = [t for t in inline if t not in self.store.columns]
        if unknown:
            raise DataError(f"behaviour: unknown table(s) {unknown}; the behaviour tables are {self.store.tables}")
        ucol = self.store.user_column
        out = {}
        for table, cols in self.store.columns.items():
            rows = [{ucol: user, **r} for r in inline.get(table, [])]
            frame = actions_frame(rows, cols, f"behaviour.{table}")
            other = frame[ucol] != user
            if other.any():
                raise DataError(f"behaviour.{table}[{int(other.arg_max())}].{ucol}: a row of another user")
            self._validate_rows(frame, table, f"behaviour.{table}")
            out[table] = frame
        return out

    def _validate_rows(self, frame: pl.DataFrame, table: str, where: str) -> None:
        """The training data's checks of a behaviour table (ids in range, timestamps...), for
        rows a request brings; the message is prefixed with the request field."""
        from mtfm.data.validate import validate_sequence_table

        try:
            validate_sequence_table(frame, self.schema, sequence_tables(self.schema)[table], where)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None

    def score(self, scenario: str, user: int, candidates: Sequence[Mapping[str, Any]],
              user_features: Mapping[str, Any] | None = None,
              behaviour: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
              timestamp: int | None = None) -> ScoreResult:
        """Probabilities per task for each candidate, in the order given."""
        from mtfm.data.aggregate import build_request

        sm = self._scenario(scenario)
        t = self.request_time(timestamp)
        frame = self.candidates_frame(scenario, user, candidates, user_features or {})
        version = (t // self.schema.window, self.store.user_version(user))  # read before the rows
        tables = self.behaviour_tables(user, t, behaviour)
        try:
            batch = build_request(tables, sm.manifest, user, scenario, frame, t)
        except DataError as err:
            raise DataError(f"candidates: {err}") from None
        use_cache = self.cache is not None and behaviour is None
        key = (user, str(sm.checkpoint))
        prefix = self.cache.get(key, version) if use_cache else None
        state, spent = ("hit" if prefix is not None else "miss") if use_cache else "off", 0.0
        if prefix is None:
            t0 = time.perf_counter()
            prefix = compute_prefix(sm.model, batch)
            spent = time.perf_counter() - t0
            with self.stats.lock:
                self.stats.prefix_computed += 1
                self.stats.prefix_seconds += spent
            if use_cache:
                self.cache.put(key, version, prefix)
        logits = score_candidates(sm.model, batch, prefix, self.micro_batch)[scenario]
        probs = torch.sigmoid(logits.double())
        rows = batch.scenarios[scenario].source_row
        ordered = torch.empty_like(probs).index_copy_(0, rows, probs) if rows is not None else probs
        if not torch.isfinite(ordered).all():
            raise DataError("candidates: the model gave non-finite scores (feature values far outside training range)")
        return ScoreResult({task: ordered[:, k].tolist() for k, task in enumerate(sm.tasks)}, sm.version, state, spent)

    def append_actions(self, table: str, user: int, actions: Sequence[Mapping[str, Any]]) -> int:
        """Validate and append one user's new actions to ``table``; drop the user's cached prefixes."""
        if table not in self.store.columns:
            raise DataError(f"table: unknown behaviour table {table!r}; the store has {self.store.tables}")
        ucol = self.store.user_column
        rows = [{ucol: user, **a} for a in actions]
        frame = actions_frame(rows, self.store.columns[table], "actions")
        other = frame[ucol] != user
        if other.any():
            raise DataError(f"actions[{int(other.arg_max())}].{ucol}: an action of another user")
        self._validate_rows(frame, table, "actions")
        n = self.store.append(table, frame)
        if self.cache is not None:
            for sm in self.models.values():
                self.cache.invalidate((user, str(sm.checkpoint)))
        return n


def run_data_dir(run_dir: str | Path) -> Path:
    """The prepared data directory a run recorded (``data.dir`` of its latest checkpoint's config)."""
    from mtfm.train.checkpoint import CheckpointManager, read_checkpoint_config

    latest = CheckpointManager(run_dir).latest()
    if latest is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint (train with `mtfm train --out {run_dir}`)")
    recorded = (read_checkpoint_config(latest).get("data") or {}).get("dir")
    if not recorded:
        raise ValueError(f"{run_dir}: the run records no data directory; pass --data DIR")
    return Path(recorded)


def make_scorer(run_dir: str | Path, data_dir: str | Path, store: BehaviourStore, *, checkpoint: str = "best",
                cache_bytes: int = 256 << 20, cache_ttl_s: float = 300.0, micro_batch: int | None = 256,
                allow_other_data: bool = False) -> Scorer:
    """A :class:`Scorer` of ``run_dir`` over ``store`` (``cache_bytes`` 0: no prefix cache)."""
    if store.fingerprint != data_fingerprint(data_dir):
        raise ValueError(f"{store.path}: built from other data than {data_dir}")
    models = load_models(run_dir, data_dir, checkpoint, allow_other_data)
    missing = [s for s in models if s not in store.request_columns]
    if missing:
        raise ValueError(f"{store.path}: no request columns for scenario(s) {missing}")
    cache = PrefixCache(cache_bytes, cache_ttl_s) if cache_bytes > 0 else None
    return Scorer(models, store, cache, {s: store.request_columns[s] for s in models}, micro_batch)
