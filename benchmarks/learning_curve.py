"""The learning curve of issue 10: MTFM multi and LR test GAUC, and the share of the LR -> oracle
GAUC gap MTFM closes, as the synthetic world grows. Reads the ``report.json`` that
``benchmarks/run_experiments.py`` writes for each world size (run it first, e.g.)::

    for n in 4000 16000; do
      python benchmarks/run_experiments.py --users $n --no-singles --epochs 3 --patience 2 --out runs/curve/$n
    done
    python benchmarks/learning_curve.py runs/curve/4000 runs/curve/16000 --png benchmarks/results/learning_curve.png

Prints a markdown table (mean ± std over seeds) and draws one panel per scenario and task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _load(dirs: list[str]) -> list[tuple[int, dict]]:
    reports = []
    for d in dirs:
        report = json.loads((Path(d) / "report.json").read_text())
        # nested worlds (run_experiments.py --train-users N) share one test set: their x is N
        users = report["config"].get("train_users") or report["config"]["users"]
        reports.append((int(users), report))
    return sorted(reports, key=lambda x: x[0])


def _ms(values: list[float | None]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None], dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _paired_bound(a: list[float | None], b: list[float | None]) -> float | None:
    """One-sided 95% lower bound of mean(a - b), paired by seed (t distribution)."""
    from scipy import stats

    d = np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], dtype=float)
    if d.size < 2:
        return None
    return float(d.mean() - stats.t.ppf(0.95, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))


def table(reports: list[tuple[int, dict]]) -> str:
    lines = ["| users | scenario | task | LR GAUC | MTFM GAUC | oracle GAUC | GAUC gap closed | MTFM - LR GAUC [bound] "
             "| seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for users, report in reports:
        for s, tasks in report["scenarios"].items():
            for t, row in tasks.items():
                (lr, lr_sd), (mt, mt_sd), (gap, gap_sd) = _ms(row["lr_gauc"]), _ms(row["multi_gauc"]), _ms(row["gap_closed"])
                bound = _paired_bound(row["multi_gauc"], row["lr_gauc"])
                delta = f"{mt - lr:+.4f} [{bound:+.4f}]" if bound is not None else f"{mt - lr:+.4f}"
                lines.append(f"| {users:,} | {s} | {t} | {lr:.4f} ± {lr_sd:.4f} | {mt:.4f} ± {mt_sd:.4f} | "
                             f"{row['oracle_gauc']:.4f} | {100 * gap:.0f}% ± {100 * gap_sd:.0f}% | {delta} | "
                             f"{len(report['seeds'])} |")
    return "\n".join(lines)


def plot(reports: list[tuple[int, dict]], png: str, tasks: list[str]) -> None:
    """One panel per (scenario, task) of ``tasks``; the rare tasks' gap closed (tens of users scored)
    swings by hundreds of percent and would flatten the others, so they are left to the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [(s, t) for s, have in reports[0][1]["scenarios"].items() for t in have if t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True, squeeze=False)
    users = [u for u, _ in reports]
    for ax, (s, t) in zip(axes[0], panels):
        stats = [_ms(r["scenarios"][s][t]["gap_closed"]) for _, r in reports]
        ax.errorbar(users, [100 * m for m, _ in stats], yerr=[100 * sd for _, sd in stats], marker="o", capsize=3,
                    label="MTFM multi")
        ax.axhline(0, color="grey", lw=0.8, label="LR")
        ax.set_xscale("log")
        ax.set_xticks(users, [f"{u // 1000}k" for u in users])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the sizes are labelled
        ax.set_title(f"{s} {t}")
        ax.set_xlabel("users with training labels")
    axes[0][0].set_ylabel("GAUC gap LR -> oracle closed (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run_experiments.py output directories, one per world size")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--tasks", nargs="+", default=["ctr", "ctcvr"], help="tasks to plot (the table has all)")
    args = p.parse_args()
    reports = _load(args.runs)
    print(table(reports))
    if args.png:
        plot(reports, args.png, args.tasks)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
