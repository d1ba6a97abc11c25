"""Issue 16: add a scenario at low cost. From scratch on HP,PHF,SQS versus a model trained on HP,PHF
then warm-started with SQS (``mtfm train --init-from RUN --freeze none|shared|backbone``).

Every run is a plain ``mtfm train`` in its own process, one at a time, one thread (``--threads 1``),
the library's training preset (lr 3e-4, batch 64) for ``--epochs`` epochs, with a training
checkpoint every ``--eval-every`` steps (kept: ``keep_checkpoints`` raised in a training config
written beside the runs). Afterwards each checkpoint of the from-scratch and extension runs is
scored on the valid split's SQS exposures, giving the SQS GAUC curve (ctr, ctcvr) by step, training
seconds (the train_log.csv rows up to that step: training only, no evaluation) and training
exposures. The target is the from-scratch run's SQS valid GAUC at its ``best-SQS`` snapshot (the
one it would serve). Final numbers: ``mtfm evaluate``'s test GAUC (each scenario's best snapshot)
of every run, the old scenarios before (the HP,PHF run) and after extension side by side::

    python benchmarks/extend_scenario.py --data /work/exp10/e4k/data --out runs/issue16_extend --epochs 3

Writes OUT/report.json and prints the markdown tables (benchmarks/results/issue16_extend.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("ctr", "ctcvr")
NEW = "SQS"


def train(data: str, out: Path, scenarios: str, epochs: int, config: Path, every: int, extra: list[str]) -> float:
    """One ``mtfm train`` process (skipped when OUT already finished); returns its wall seconds."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "bench_wall.json").read_text())["wall_s"]
    cmd = [sys.executable, "-m", "mtfm", "train", "--data", data, "--out", str(out), "--scenarios", scenarios,
           "--epochs", str(epochs), "--threads", "1", "--quiet", "--config", str(config),
           "--checkpoint-every", str(every), *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    (out / "bench_wall.json").write_text(json.dumps({"wall_s": wall, "command": " ".join(cmd[2:])}))
    return wall


def log_totals(run: Path) -> list[tuple[int, float, float]]:
    """(step, cumulative training seconds, cumulative exposures) at every training row of train_log.csv."""
    rows, seconds, exposures = [], 0.0, 0.0
    with open(run / "train_log.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["exposures_per_s"]:  # a training row (epoch-end rows carry the valid score instead)
                seconds += float(r["elapsed_s"])
                exposures += float(r["exposures_per_s"]) * float(r["elapsed_s"])
                rows.append((int(r["step"]), seconds, exposures))
    return rows


def at_step(totals: list[tuple[int, float, float]], step: int) -> tuple[float, float]:
    """Training seconds and exposures up to ``step`` (the last log row at or before it; rows are 10 steps apart)."""
    last = (0.0, 0.0)
    for s, sec, exp in totals:
        if s > step:
            break
        last = (sec, exp)
    return last


def sqs_valid(ckpt: Path, data: str) -> dict[str, float]:
    """The new scenario's valid GAUC per task from one checkpoint."""
    from mtfm.train.evaluate import checkpoint_loader, compute_metrics, predict
    from mtfm.train.models import model_from_checkpoint
    import torch

    model, _, _ = model_from_checkpoint(ckpt)
    loader = checkpoint_loader(ckpt, data, "valid", [NEW], 256)
    tasks = {s.name: s.task_names for s in loader.schema.scenarios}
    metrics = compute_metrics(predict(model, loader.iterate(0), torch.device("cpu"), tasks), tasks)
    return {t: metrics[NEW][t]["gauc"] for t in TASKS}


def curve(run: Path, data: str) -> list[dict]:
    """SQS valid GAUC at every kept training checkpoint, with the training cost up to it; the
    step checkpoints are removed afterwards (only the snapshots are needed later)."""
    totals = log_totals(run)
    points = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        seconds, exposures = at_step(totals, step)
        points.append({"step": step, "train_s": seconds, "exposures": exposures, **sqs_valid(ckpt, data)})
    return points


def first_reaching(points: list[dict], task: str, target: float | None) -> dict | None:
    if target is None:
        return None
    return next((p for p in points if p[task] is not None and p[task] >= target), None)


def test_gauc(run: Path, data: str) -> dict[str, dict[str, float]]:
    from mtfm.train.evaluate import evaluate_run

    metrics, _ = evaluate_run(run, data, "test")
    return {s: {t: metrics[s][t]["gauc"] for t in TASKS} for s in metrics}


def best_sqs_valid(run: Path) -> dict[str, float]:
    """Valid GAUC of the run's best-SQS snapshot (the epoch its selection serves SQS from)."""
    m = json.loads((run / "metrics.json").read_text())
    epoch = m["best_by_scenario"][NEW]["epoch"]
    valid = next(h["valid"] for h in m["history"] if h["epoch"] == epoch)
    return {t: valid[NEW][t]["gauc"] for t in TASKS}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown(report: dict) -> str:
    runs, target = report["runs"], report["target"]
    lines = [f"Target: the from-scratch run's SQS valid GAUC at its best-SQS snapshot: "
             + ", ".join(f"{t} {_f(target[t])}" for t in TASKS), "",
             "| run | trained on | task | steps to target | train s to target | exposures to target | "
             "SQS valid GAUC at end | total steps | total train s | wall s (process) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if "curve" not in r:
            continue
        for t in TASKS:
            hit = r["reach"][t]
            end = r["curve"][-1][t]
            cells = ([f"{hit['step']:,}", f"{hit['train_s']:.0f}", f"{hit['exposures']:,.0f}"] if hit
                     else ["not reached"] * 3)
            lines.append(f"| {name} | {r['trained']} | {t} | " + " | ".join(cells)
                         + f" | {_f(end)} | {r['curve'][-1]['step']:,} | {r['curve'][-1]['train_s']:.0f} | {r['wall_s']:.0f} |")
    lines += ["", "Test GAUC (each scenario's best snapshot, `mtfm evaluate`):", "",
              "| run | " + " | ".join(f"{s} {t}" for s in ("HP", "PHF", "SQS") for t in TASKS) + " |",
              "|---|" + "---|" * 6]
    for name, r in runs.items():
        cells = [_f(r["test"][s][t]) if s in r["test"] else "-" for s in ("HP", "PHF", "SQS") for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "SQS valid GAUC curve (step: ctr / ctcvr):", ""]
    for name, r in runs.items():
        if "curve" in r:
            lines.append(f"- {name}: " + "; ".join(f"{p['step']}: {_f(p['ctr'])}/{_f(p['ctcvr'])}" for p in r["curve"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/exp10/e4k/data")
    ap.add_argument("--out", default="runs/issue16_extend")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=90, help="training steps between curve points")
    ap.add_argument("--freeze", default="none,shared,backbone", help="extension variants, run in this order")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    from mtfm.train.config import load_train_config

    config = out / "train_config.yaml"  # the training preset, with every step checkpoint kept for the curve
    config.write_text(yaml.safe_dump({**load_train_config("mtfm").model_dump(mode="json"), "keep_checkpoints": 1000}))
    runs: dict[str, dict] = {}

    def run(name: str, scenarios: str, extra: list[str], with_curve: bool) -> None:
        path = out / name
        wall = train(args.data, path, scenarios, args.epochs, config, args.eval_every, extra)
        entry = {"trained": scenarios, "wall_s": wall, "args": extra}
        if with_curve:
            cached = path / "bench_curve.json"
            if not cached.is_file():
                cached.write_text(json.dumps(curve(path, args.data)))
            entry["curve"] = json.loads(cached.read_text())
        for ckpt in sorted((path / "checkpoints").glob("step-*"))[:-1]:  # curve taken: keep the latest + snapshots
            shutil.rmtree(ckpt)
        entry["test"] = test_gauc(path, args.data)
        runs[name] = entry

    run("scratch", "HP,PHF,SQS", [], True)
    run("base_hp_phf", "HP,PHF", [], False)
    for freeze in [f for f in args.freeze.split(",") if f]:
        run(f"extend_{freeze}", "HP,PHF,SQS", ["--init-from", str(out / "base_hp_phf"), "--freeze", freeze], True)
    target = best_sqs_valid(out / "scratch")
    for r in runs.values():
        if "curve" in r:
            r["reach"] = {t: first_reaching(r["curve"], t, target[t]) for t in TASKS}
    report = {"data": args.data, "epochs": args.epochs, "eval_every": args.eval_every, "target": target, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
