"""How far each accuracy figure moved between two ``run_experiments.py`` reports of the same
campaign (same data, seeds and options), for example before and after a fix.

    python benchmarks/compare_reports.py benchmarks/results/experiments/synthetic-before-issue9.json runs/exp/synthetic/report.json

Prints one Markdown row per scenario and task: the mean over seeds of each model's AUC and
GAUC in the old and new report, and new - old. Models that a change could not touch (the LR
baseline reads no sequence) should not move: a check that the two campaigns are comparable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def movement(old: dict, new: dict) -> str:
    lines = ["| scenario | task | model | AUC old | AUC new | Δ AUC | GAUC old | GAUC new | Δ GAUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s, tasks in new["scenarios"].items():
        for t, row in tasks.items():
            before = old["scenarios"].get(s, {}).get(t)
            if before is None:
                continue
            for model in ("multi", "single", "lr"):
                cells = []
                for m in ("auc", "gauc"):
                    a, b = _mean(before[f"{model}_{m}"]), _mean(row[f"{model}_{m}"])
                    fmt = lambda x: "-" if x is None else f"{x:.4f}"
                    cells += [fmt(a), fmt(b), "-" if a is None or b is None else f"{b - a:+.4f}"]
                name = {"multi": "MTFM multi", "single": "MTFM single", "lr": "LR"}[model]
                lines.append(f"| {s} | {t} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    args = p.parse_args()
    print(movement(json.loads(args.old.read_text()), json.loads(args.new.read_text())))


if __name__ == "__main__":
    main()
