"""Model selection and early stopping: which valid metric picks the ``best`` snapshots.

At the end of every epoch the trainer scores the valid split (AUC, GAUC, logloss per scenario
and task, :mod:`mtfm.train.evaluate`) and turns those numbers into one score per pointer:
``best`` (one model for every scenario) and ``best-<S>`` (scenario S's own snapshot, the one its
subgraph is served from). A :class:`Selection` says how (``mtfm train --select``, or ``select:``
in the training config YAML):

``gauc`` / ``auc`` / ``logloss``
    the global metric (default ``gauc``): ``best`` is this metric over every scenario's tasks,
    and it is each scenario's metric unless overridden.
``SCENARIO=METRIC``, ``SCENARIO@TASK+TASK``, ``SCENARIO=METRIC@TASK+TASK``
    a per-scenario override: ``best-SCENARIO`` is METRIC (default: the global one) over these
    tasks (default: all of the scenario's). A task list also restricts which of the scenario's
    tasks count in ``best``; ``best`` always uses the global metric, so that it compares like
    with like across scenarios.

Items are comma separated or given as repeated flags: ``--select auc,SQS=gauc@ctr`` equals
``--select auc --select SQS=gauc@ctr``. Metric names are reserved words, so a bare ``auc`` is
always the global metric.

Weighted means, so a handful of users cannot decide: a score averages its (scenario, task)
values weighted by how much evidence each rests on: GAUC by the users it averages over (users
with both classes, ``users_scored``), AUC by the task's positives, logloss by its exposures.
Logloss is lower-is-better; its score is ``-logloss`` so that every score is higher-is-better
(and ``min_delta`` means the same thing for all three). A (scenario, task) without a value
(one class only, no exposures) or with zero weight is left out; a score with nothing left is
None (it never improves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtfm.config import DataSchema

SelectMetric = Literal["gauc", "auc", "logloss"]
METRICS: tuple[str, ...] = ("gauc", "auc", "logloss")

# What each metric's mean is weighted by (a key of the valid metrics of one scenario x task).
WEIGHTS: dict[str, str] = {"gauc": "users_scored", "auc": "positives", "logloss": "exposures"}

GRAMMAR = "METRIC or SCENARIO[=METRIC][@TASK+TASK], comma separated (METRIC: gauc, auc, logloss)"


class SelectionError(ValueError):
    """A selection that does not parse, or names a scenario / task the run does not have."""


class ScenarioSelection(BaseModel):
    """A per-scenario override: ``metric`` (None: the global one) over ``tasks`` (None: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: SelectMetric | None = None
    tasks: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> "ScenarioSelection":
        if self.metric is None and self.tasks is None:
            raise ValueError("an override needs a metric or tasks")
        if self.tasks is not None:
            if not self.tasks or any(not t for t in self.tasks):
                raise ValueError(f"tasks must be non-empty names, got {list(self.tasks)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"a task is named twice in {list(self.tasks)}")
        return self

    def text(self) -> str:
        return (f"={self.metric}" if self.metric else "") + (f"@{'+'.join(self.tasks)}" if self.tasks else "")


class Selection(BaseModel):
    """Which valid metric selects the ``best`` / ``best-<S>`` snapshots and drives early stopping.

    Built from the grammar (:func:`parse_selection`; a string or a list of strings is parsed
    when validating, so ``select: "auc,SQS=gauc@ctr"`` works in YAML) or from the mapping
    ``{metric: auc, scenarios: {SQS: {metric: gauc, tasks: [ctr]}}}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: SelectMetric = Field(default="gauc", description="the global metric (best, and scenarios not overridden)")
    scenarios: dict[str, ScenarioSelection] = Field(default_factory=dict, description="per-scenario overrides")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return parse_selection(value).model_dump()
        return value

    @classmethod
    def parse(cls, items: str | Iterable[str]) -> "Selection":
        return parse_selection(items)

    def __str__(self) -> str:
        return ",".join([self.metric, *(f"{s}{o.text()}" for s, o in self.scenarios.items())])

    # ---- per scenario ----------------------------------------------------------------------

    def metric_of(self, scenario: str) -> str:
        override = self.scenarios.get(scenario)
        return override.metric if override is not None and override.metric else self.metric

    def tasks_of(self, scenario: str, all_tasks: list[str]) -> list[str]:
        override = self.scenarios.get(scenario)
        return list(override.tasks) if override is not None and override.tasks else list(all_tasks)

    def rule(self, pointer: str) -> str:
        """What selects ``pointer`` (``best`` or ``best-<S>``), in the grammar's words."""
        if pointer == "best":
            return str(self)
        scenario = pointer.removeprefix("best-")
        override = self.scenarios.get(scenario)
        tasks = override.tasks if override is not None else None
        return self.metric_of(scenario) + (f"@{'+'.join(tasks)}" if tasks else "")

    def check(self, schema: DataSchema) -> None:
        """Refuse a scenario or task the run does not have, naming it and listing the valid ones."""
        tasks = {s.name: s.task_names for s in schema.scenarios}
        for scenario, override in self.scenarios.items():
            if scenario not in tasks:
                raise SelectionError(f"select: unknown scenario {scenario!r} in {str(self)!r}; this run's scenarios "
                                     f"are {list(tasks)}")
            unknown = [t for t in override.tasks or () if t not in tasks[scenario]]
            if unknown:
                raise SelectionError(f"select: scenario {scenario!r} has no task(s) {unknown} (in {str(self)!r}); its "
                                     f"tasks are {tasks[scenario]}")

    # ---- scores ----------------------------------------------------------------------------

    def scores(self, metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float | None]:
        """``{"best": score, "best-<S>": score, ...}`` from one split's metrics (see module doc)."""
        overall = [(s, t) for s, per_task in metrics.items() for t in self.tasks_of(s, list(per_task))]
        result = {"best": weighted_score(metrics, self.metric, overall)}
        for s, per_task in metrics.items():
            result[f"best-{s}"] = weighted_score(metrics, self.metric_of(s),
                                                 [(s, t) for t in self.tasks_of(s, list(per_task))])
        return result


def weighted_score(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], metric: str,
                   pairs: Iterable[tuple[str, str]]) -> float | None:
    """The mean of ``metric`` over (scenario, task) ``pairs`` weighted by :data:`WEIGHTS`;
    ``-logloss`` for logloss (higher is better). None when no pair has a value and weight."""
    values, weights = [], []
    for scenario, task in pairs:
        m = metrics[scenario][task]
        value, weight = m.get(metric), m.get(WEIGHTS[metric]) or 0
        if value is None or not np.isfinite(value) or weight <= 0:
            continue
        values.append(-value if metric == "logloss" else value)
        weights.append(float(weight))
    if not values:
        return None
    v, w = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    return float(np.sum(v * w) / np.sum(w))


def parse_selection(items: str | Iterable[str]) -> Selection:
    """Parse ``--select`` items (see module doc); errors name the item and what is wrong with it."""
    parts = [items] if isinstance(items, str) else list(items)
    tokens = [t.strip() for part in parts for t in str(part).split(",")]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise SelectionError(f"select: empty; expected {GRAMMAR}")
    metric: str | None = None
    scenarios: dict[str, ScenarioSelection] = {}
    for token in tokens:
        if token in METRICS:
            if metric is not None and metric != token:
                raise SelectionError(f"select: two global metrics, {metric!r} and {token!r}; give one")
            metric = token
            continue
        head, at, task_text = token.partition("@")
        scenario, eq, metric_text = head.partition("=")
        scenario = scenario.strip()
        if not scenario:
            raise SelectionError(f"select: {token!r}: no scenario name before '{'=' if eq else '@'}' (expected {GRAMMAR})")
        if not eq and not at:
            raise SelectionError(f"select: {token!r} is neither a metric ({', '.join(METRICS)}) nor a scenario override "
                                 f"SCENARIO=METRIC / SCENARIO@TASK+TASK (e.g. {token}=auc or {token}@ctr)")
        metric_text = metric_text.strip()
        if eq and metric_text not in METRICS:
            raise SelectionError(f"select: {token!r}: unknown metric {metric_text!r}; expected one of "
                                 f"{', '.join(METRICS)}")
        tasks = None
        if at:
            tasks = tuple(t.strip() for t in task_text.split("+"))
            if not all(tasks):
                raise SelectionError(f"select: {token!r}: empty task name in {task_text!r} (expected TASK+TASK)")
            if len(set(tasks)) != len(tasks):
                raise SelectionError(f"select: {token!r}: a task is named twice")
        if scenario in scenarios:
            raise SelectionError(f"select: scenario {scenario!r} is given twice; give one override per scenario")
        scenarios[scenario] = ScenarioSelection(metric=metric_text or None, tasks=tasks)
    return Selection.model_construct(metric=metric or "gauc", scenarios=scenarios)
