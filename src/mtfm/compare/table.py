"""The comparison's report: a Table-2-style markdown table and MTFM's paired verdicts.

Per (scenario, task) cell and metric (AUC, GAUC): every model's mean +- std over seeds, the
best mean in **bold** and the second <u>underlined</u>; the oracle row (true probabilities as
scores) where the data knows them. A cell whose test split holds fewer than ``min_positives``
positives is marked (``†``) and left out of the verdicts: a few hundred positives give AUC
standard errors of about 0.01-0.02, larger than the gaps between models.

The verdict per cell (:func:`verdicts`): MTFM against the best other model by mean, paired by
seed (each seed's MTFM minus that model's), with a one-sided 95% t lower bound of the mean
difference. "beyond seed noise" means that bound is above zero (at least 2 seeds needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtfm.compare.runner import MODEL_LABELS, ModelResult

METRICS = ("auc", "gauc")


@dataclass(frozen=True)
class Cell:
    scenario: str
    task: str
    positives: int

    @property
    def name(self) -> str:
        return f"{self.scenario} {self.task}"


def cells(results: list[ModelResult]) -> list[Cell]:
    """Every (scenario, task) of the test metrics, in schema order, with its test positives."""
    test = results[0].runs[0].test
    return [Cell(s, t, int(m.get("positives") or 0)) for s, tasks in test.items() for t, m in tasks.items()]


def values(result: ModelResult, cell: Cell, metric: str) -> list[float | None]:
    """One value per seed (``None`` where the metric is undefined)."""
    return [r.test.get(cell.scenario, {}).get(cell.task, {}).get(metric) for r in result.runs]


def _mean_std(xs: list[float | None]) -> tuple[float | None, float]:
    v = np.array([x for x in xs if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, 0.0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_lower_bound(diffs: list[float]) -> float | None:
    """One-sided 95% lower bound of the mean of paired differences (t distribution)."""
    if len(diffs) < 2:
        return None
    from scipy import stats

    d = np.array(diffs, dtype=np.float64)
    return float(d.mean() - stats.t.ppf(0.95, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))


def _ranked(results: list[ModelResult], cell: Cell, metric: str) -> list[str]:
    means = {r.model: _mean_std(values(r, cell, metric))[0] for r in results}
    return sorted((m for m, v in means.items() if v is not None), key=lambda m: -means[m])


def markdown_table(results: list[ModelResult], min_positives: int) -> str:
    """One table per scenario: a row per model (plus the oracle), a column per task and metric."""
    all_cells = cells(results)
    blocks = []
    for scenario in dict.fromkeys(c.scenario for c in all_cells):
        blocks.append(_scenario_table(results, [c for c in all_cells if c.scenario == scenario], min_positives))
    positives = ", ".join(f"{c.name} {c.positives:,}" for c in all_cells)
    blocks.append(f"Test positives per cell: {positives}. † fewer than {min_positives}: too few to rank models.")
    return "\n\n".join(blocks)


def _scenario_table(results: list[ModelResult], scenario_cells: list[Cell], min_positives: int) -> str:
    header = ["model"] + [f"{c.name}{'†' if c.positives < min_positives else ''} {m.upper()}"
                          for c in scenario_cells for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranks = {(c, m): _ranked(results, c, m) for c in scenario_cells for m in METRICS}
    for r in results:
        row = [MODEL_LABELS.get(r.model, r.model)]
        for c in scenario_cells:
            for m in METRICS:
                row.append(_marked(r, c, m, ranks[(c, m)]))
        lines.append("| " + " | ".join(row) + " |")
    oracle = results[0].runs[0].test
    if any(oracle[c.scenario][c.task].get("oracle_auc") is not None for c in scenario_cells):
        row = ["oracle (true p)"]
        for c in scenario_cells:
            for m in METRICS:
                v = oracle[c.scenario][c.task].get(f"oracle_{m}")
                row.append("-" if v is None else f"{v:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _marked(result: ModelResult, cell: Cell, metric: str, order: list[str]) -> str:
    mean, std = _mean_std(values(result, cell, metric))
    text = "-" if mean is None else f"{mean:.4f} ± {std:.4f}"
    if order and result.model == order[0]:
        return f"**{text}**"
    if len(order) > 1 and result.model == order[1]:
        return f"<u>{text}</u>"
    return text


@dataclass
class Verdict:
    cell: str
    metric: str
    mtfm_mean: float | None
    best_other: str | None
    other_mean: float | None
    mean_diff: float | None
    lower_bound: float | None
    outcome: str  # "wins beyond seed noise", "ahead within noise", "behind", "underpowered", "n/a"


def verdicts(results: list[ModelResult], min_positives: int, model: str = "mtfm") -> list[Verdict]:
    """MTFM (or ``model``) against the best other model, per cell and metric, paired by seed."""
    by_name = {r.model: r for r in results}
    if model not in by_name or len(results) < 2:
        return []
    out = []
    for c in cells(results):
        for m in METRICS:
            out.append(_verdict(by_name, model, c, m, min_positives))
    return out


def _verdict(by_name: dict[str, ModelResult], model: str, cell: Cell, metric: str, min_positives: int) -> Verdict:
    mine = values(by_name[model], cell, metric)
    mean = _mean_std(mine)[0]
    others = {n: _mean_std(values(r, cell, metric))[0] for n, r in by_name.items() if n != model}
    others = {n: v for n, v in others.items() if v is not None}
    if mean is None or not others:
        return Verdict(cell.name, metric, mean, None, None, None, None, "n/a")
    best = max(others, key=lambda n: others[n])
    theirs = values(by_name[best], cell, metric)
    seeds_mine = [r.seed for r in by_name[model].runs]
    seeds_theirs = [r.seed for r in by_name[best].runs]
    diffs = [a - theirs[seeds_theirs.index(s)] for s, a in zip(seeds_mine, mine)
             if s in seeds_theirs and a is not None and theirs[seeds_theirs.index(s)] is not None]
    diff = float(np.mean(diffs)) if diffs else mean - others[best]
    bound = paired_lower_bound(diffs)
    if cell.positives < min_positives:
        outcome = "underpowered"
    elif diff <= 0:
        outcome = "behind"
    elif bound is not None and bound > 0:
        outcome = "wins beyond seed noise"
    else:
        outcome = "ahead within noise"
    return Verdict(cell.name, metric, mean, best, others[best], diff, bound, outcome)


def verdict_lines(items: list[Verdict], model: str = "mtfm") -> str:
    """The verdicts as a markdown list, one line per cell and metric."""
    if not items:
        return ""
    label = MODEL_LABELS.get(model, model)
    lines = [f"{label} against the best other model per cell (paired over seeds, one-sided 95% t bound):"]
    for v in items:
        if v.best_other is None:
            lines.append(f"- {v.cell} {v.metric.upper()}: n/a")
            continue
        bound = "-" if v.lower_bound is None else f"{v.lower_bound:+.4f}"
        lines.append(f"- {v.cell} {v.metric.upper()}: {v.outcome} (vs {MODEL_LABELS.get(v.best_other, v.best_other)}: "
                     f"diff {v.mean_diff:+.4f}, lower bound {bound})")
    return "\n".join(lines)


def throughput_lines(results: list[ModelResult]) -> str:
    """Training speed and chosen lr per model (the cost side of the table)."""
    lines = ["| model | chosen lr | lr sweep (valid mean GAUC) | train s / run | train exposures/s |", "|---|---|---|---|---|"]
    for r in results:
        sweep = ", ".join(f"{s.lr:.3g}: {'-' if s.valid_score is None else f'{s.valid_score:.4f}'}" for s in r.sweep)
        secs = np.mean([x.train_seconds for x in r.runs])
        rates = [x.exposures_per_s for x in r.runs if x.exposures_per_s]
        rate = f"{np.mean(rates):,.0f}" if rates else "-"
        lines.append(f"| {MODEL_LABELS.get(r.model, r.model)} | {r.chosen_lr:.3g} | {sweep} | {secs:.0f} | {rate} |")
    return "\n".join(lines)


def report_text(results: list[ModelResult], min_positives: int, data: str) -> str:
    """The whole markdown report: table, verdicts, throughput."""
    parts = [f"Comparison on `{data}` (test split; mean ± std over seeds {sorted({r.seed for r in results[0].runs})})", "",
             markdown_table(results, min_positives), ""]
    lines = verdict_lines(verdicts(results, min_positives))
    if lines:
        parts += [lines, ""]
    parts += [throughput_lines(results)]
    return "\n".join(parts) + "\n"


def write_report(results: list[ModelResult], cfg, out: Path, data: Path) -> None:
    """``OUT/table.md`` (the report) and ``OUT/compare.json`` (every run's metrics and the verdicts)."""
    import json
    from dataclasses import asdict

    (out / "table.md").write_text(report_text(results, cfg.min_positives, str(data)))
    record = {"data": str(data), "config": cfg.model_dump(mode="json"),
              "models": [asdict(r) for r in results],
              "verdicts": [asdict(v) for v in verdicts(results, cfg.min_positives)]}
    tmp = out / "compare.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / "compare.json")
