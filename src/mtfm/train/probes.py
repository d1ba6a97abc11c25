"""Signal-recovery probes: did a trained model learn what the synthetic world planted?

The synthetic world (:mod:`mtfm.data.sources.synthetic`) knows its true effects, so a trained
model can be asked counterfactual questions with known answers. The world adds
``realtime_boost`` to the click logit of an exposure while the user clicked an item of the
same cuisine in the last ``realtime_window_s`` seconds, in any scenario or in organic search.
That signal reaches a model only through its real-time (R) tokens: each scenario's past-CTR
cross feature counts that scenario's own clicks, and the probes leave an exposure's own
features as they are.

For test exposures whose real-time boost is off (no same-cuisine click in the window before
them), a probe scores the exposure as a serving request (:func:`mtfm.data.aggregate.build_request`,
the training feature code; requests equal training samples, ``tests/test_leakage.py``), then
again with one click inserted into the user's behaviour log:

* ``search, same cuisine, 10 min``: an organic search click; the world's change is +boost;
* ``other feed, same cuisine, 10 min``: a click in another scenario's feed (cross-scenario
  transfer through R); +boost;
* ``search, same cuisine, 3 h``: outside the window; 0;
* ``search, other cuisine, 10 min``: 0.

The model's change of the ctr logit is compared with the world's change, as mean and spread
over exposures. A model that learned the effect moves by about +boost on the first two and by
about 0 on the controls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mtfm.data.store import Manifest, read_manifest

MINUTE = 60


@dataclass(frozen=True)
class Probe:
    """One inserted click: how long before the exposure, in which scenario (0 = organic search,
    else the 1-based feed index of the behaviour tables), on the exposure's cuisine or another,
    and the world's true change of the click logit."""

    name: str
    before_s: int
    click_scenario: int
    same_cuisine: bool
    true_change: float


@dataclass(frozen=True)
class ProbeResult:
    scenario: str
    probe: str
    true_change: float
    mean: float
    std: float
    exposures: int

    @property
    def share(self) -> float | None:
        """The share of the true effect the model recovers (None for a control, whose truth is 0)."""
        return self.mean / self.true_change if self.true_change else None


def world_probes(scenario_index: int, other_feed: int, boost: float, window_s: int) -> list[Probe]:
    """The four probes of one scenario (see the module docstring)."""
    from mtfm.data.sources.synthetic import SCENARIO_SEARCH

    recent, old = 10 * MINUTE, 180 * MINUTE
    if not recent < window_s < old:
        raise ValueError(f"probes assume a real-time window between 10 min and 3 h, the world has {window_s} s")
    return [
        Probe("search, same cuisine, 10 min", recent, SCENARIO_SEARCH, True, boost),
        Probe("other feed, same cuisine, 10 min", recent, other_feed, True, boost),
        Probe("search, same cuisine, 3 h", old, SCENARIO_SEARCH, True, 0.0),
        Probe("search, other cuisine, 10 min", recent, SCENARIO_SEARCH, False, 0.0),
    ]


def synthetic_world_of(manifest: Manifest, data_dir: str | Path):
    """The synthetic world config ``data_dir`` was prepared from, or a clear error."""
    from mtfm.data.sources.synthetic import SyntheticConfig

    source = manifest.source or {}
    if source.get("source") != "synthetic" or "config" not in source:
        raise ValueError(f"{data_dir}: prepared from source {source.get('source')!r}; the probes need a synthetic "
                         "world, whose true effects are known (mtfm prepare --source synthetic)")
    return SyntheticConfig(**source["config"])


def run_probes(run_dir: str | Path, data_dir: str | Path, scenarios: list[str] | None = None,
               exposures: int = 100, seed: int = 0, checkpoint: str = "best") -> list[ProbeResult]:
    """Every probe on ``exposures`` random test exposures of each scenario (default: all the run has)."""
    from mtfm.data.sources.synthetic import NUM_CUISINES, generate, scenario_defs
    from mtfm.train.evaluate import scenario_checkpoints
    from mtfm.train.models import model_from_checkpoint

    manifest = read_manifest(data_dir)
    world = synthetic_world_of(manifest, data_dir)
    raw = generate(world)  # the very world prepared, every knob of its config included
    index = {d.name: d.index for d in scenario_defs(world.num_scenarios)}
    checkpoints = scenario_checkpoints(run_dir, checkpoint)
    names = scenarios or list(checkpoints)
    unknown = [s for s in names if s not in checkpoints]
    if unknown:
        raise ValueError(f"{run_dir}: no checkpoint for scenario(s) {unknown}; the run has {list(checkpoints)}")
    results = []
    rng = np.random.default_rng(seed)
    for scenario in names:
        model, _, model_schema = model_from_checkpoint(checkpoints[scenario])
        model.eval()
        # Requests carry only the inputs the model has (an input-ablation run has no H or R).
        seen = manifest.model_copy(update={"data_schema": model_schema.model_dump(mode="json", exclude_none=True)})
        others = [i for n, i in index.items() if n != scenario]
        probes = world_probes(index[scenario], others[0] if others else index[scenario],
                              world.realtime_boost, world.realtime_window_s)
        changes = _probe_scenario(model, raw, seen, scenario, probes, exposures, rng, NUM_CUISINES,
                                  world.realtime_window_s)
        for p in probes:
            v = np.asarray(changes[p.name])
            results.append(ProbeResult(scenario, p.name, p.true_change, float(v.mean()),
                                       float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)))
    return results


class _ClickedItems:
    """Real clicks to copy the item of (id, cuisine, price) from, by (scenario, cuisine): an
    inserted click names an item the world has, clicked where the probe says, so a model that
    reads item ids instead of the cuisine column is probed fairly too."""

    def __init__(self, clicks: pl.DataFrame) -> None:
        self._by_key = clicks.partition_by(["scenario", "cuisine"], as_dict=True)

    def draw(self, scenario: int, cuisine: int, rng: np.random.Generator) -> pl.DataFrame:
        rows = self._by_key.get((scenario, cuisine))
        if rows is None or len(rows) == 0:
            raise ValueError(f"the world has no click of cuisine {cuisine} in behaviour scenario {scenario} to copy")
        return rows[int(rng.integers(0, len(rows)))]


def _probe_scenario(model, raw, manifest: Manifest, scenario: str, probes: list[Probe], exposures: int,
                    rng: np.random.Generator, num_cuisines: int, window_s: int) -> dict[str, list[float]]:
    """Logit changes per probe over test exposures of ``scenario`` whose boost is off."""
    from mtfm.data.aggregate import build_request

    schema = manifest.schema_obj
    ucol, tcol = schema.user_column, schema.time.column
    spec = schema.scenario(scenario)
    test = raw.tables[spec.table].filter(pl.col(tcol) >= manifest.split_boundaries.test_start)
    clicks, orders = raw.tables["clicks"], raw.tables["orders"]
    items = _ClickedItems(clicks.filter(pl.col(tcol) < manifest.split_boundaries.test_start))
    clicks_of = clicks.partition_by(ucol, as_dict=True)  # one filter per user instead of a scan per exposure
    orders_of = orders.partition_by(ucol, as_dict=True)
    empty_clicks, empty_orders = clicks.clear(), orders.clear()
    changes: dict[str, list[float]] = {p.name: [] for p in probes}
    for i in rng.permutation(len(test)):
        if len(changes[probes[0].name]) >= exposures:
            break
        row = test[int(i)]
        user, ts, cuisine = int(row[ucol][0]), int(row[tcol][0]), int(row["cuisine"][0])
        mine = clicks_of.get((user,), empty_clicks).filter(pl.col(tcol) < ts)
        if len(mine.filter((pl.col(tcol) >= ts - window_s) & (pl.col("cuisine") == cuisine))):
            continue  # the boost is already on: one more click changes nothing in the world
        known = {"clicks": mine, "orders": orders_of.get((user,), empty_orders).filter(pl.col(tcol) < ts)}

        def ctr_logit(tables: dict[str, pl.DataFrame]) -> float:
            batch = build_request(tables, manifest, user, scenario, row, ts)
            with torch.no_grad():
                return float(model(batch).logits[scenario][0, 0])

        base = ctr_logit(known)
        for p in probes:
            other = (cuisine + 1 + int(rng.integers(0, num_cuisines - 1))) % num_cuisines
            click = items.draw(p.click_scenario, cuisine if p.same_cuisine else other, rng)
            click = click.with_columns(pl.lit(user).alias(ucol), pl.lit(ts - p.before_s).alias(tcol))
            click = click.select([pl.col(c).cast(mine.schema[c]) for c in mine.columns])
            changes[p.name].append(ctr_logit({**known, "clicks": pl.concat([mine, click])}) - base)
    if not changes[probes[0].name]:
        raise ValueError(f"no test exposure of {scenario} without a recent same-cuisine click to probe")
    return changes


def format_probes(results: list[ProbeResult]) -> str:
    """Markdown table of probe results."""
    lines = ["| scenario | probe (one click inserted) | true change | model change (mean ± std) | share of true | exposures |",
             "|---|---|---|---|---|---|"]
    for r in results:
        share = f"{r.share:.0%}" if r.share is not None else "-"
        lines.append(f"| {r.scenario} | {r.probe} | {r.true_change:+.2f} | {r.mean:+.3f} ± {r.std:.3f} | {share} "
                     f"| {r.exposures} |")
    return "\n".join(lines)


def results_json(results: list[ProbeResult]) -> list[dict]:
    return [asdict(r) | {"share": r.share} for r in results]
