"""Accuracy experiments of issue 4, mean +- std over training seeds, on one prepared dataset.

For every seed it trains, on the same prepared data (``--no-singles``: multi and LR only):

* ``multi``: MTFM on all scenarios;
* ``single-<S>``: the same MTFM config on scenario S only (``--scenarios S``), for every S;
* ``lr``: the logistic-regression baseline (each scenario's own features, no sequences);
* with ``--input-ablations``: ``no-history``, ``no-realtime``, ``no-cross``: MTFM multi trained
  without that kind of input (``mtfm train --drop-inputs``), reported as what each contributes;

with ``--probes N`` it also runs the signal-recovery probes (``mtfm diagnose``) on each multi run;
evaluates each on the test split (``eval_test.json``) and writes a report with, per scenario
and task: AUC and GAUC of each model (mean +- std over seeds), the oracle ceiling when the
data knows it, the share of the LR -> oracle GAUC gap MTFM closes, and multi - single (paired
by seed) with a one-sided 95% t-bound, so "multi wins beyond seed noise" is a stated test:
the lower bound of the paired difference is above zero. Training throughput of every run is
summarised too.

The data is prepared once (synthetic: the default world of ``--users`` users, world seed 0,
optionally with more of its last days held out for valid / test; MovieLens-100K: the real
data); seeds vary initialisation, shuffling and dropout. Finished runs
(those with an ``eval_test.json``) are reused, so an interrupted campaign continues.

    python benchmarks/run_experiments.py --dataset synthetic --users 6000 --valid-days 2 --test-days 3 --out runs/exp/synthetic
    python benchmarks/run_experiments.py --dataset movielens --lr 1e-3 --epochs 8 --patience 2 --out runs/exp/movielens
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats

from mtfm.config import INPUT_KINDS, DataSchema, SplitSpec
from mtfm.data.aggregate import prepare
from mtfm.data.sources.synthetic import load_packaged_schema
from mtfm.data.store import read_manifest
from mtfm.model.config import load_model_config
from mtfm.train.checkpoint import write_json
from mtfm.train.config import TrainConfig, load_train_config
from mtfm.train.evaluate import evaluate_run, gap_closed
from mtfm.train.trainer import train_from_data


DAY = 86_400


def _synthetic_schema(valid_days: int, test_days: int) -> DataSchema:
    """The default world's schema with the last ``test_days`` days as test, the ``valid_days``
    before them as valid (the packaged schema: one day each)."""
    schema = load_packaged_schema()
    end = schema.split.test_start + DAY  # the packaged split makes the last exposure day the test day
    test_start = end - test_days * DAY
    return schema.model_copy(update={"split": SplitSpec(valid_start=test_start - valid_days * DAY, test_start=test_start)})


def _prepare(args: argparse.Namespace, data: Path) -> None:
    if (data / "manifest.json").is_file():
        return
    source = importlib.import_module(f"mtfm.data.sources.{args.dataset}")
    if args.dataset == "synthetic":
        raw = source.load_source(None, _synthetic_schema(args.valid_days, args.test_days), args.users, 0)
        if args.train_users is not None:
            raw = _train_users_only(raw, args.train_users)
    else:
        raw = source.load_source(args.path, None, None, 0)
    prepare(raw, data)


def _train_users_only(raw, users: int):
    """The world with the training split's exposures of users ``0 .. users - 1`` only; valid and test
    keep every user, and every user keeps all behaviour (inputs), so worlds cut at different ``users``
    share one test set and differ only in how many users' training labels they hold."""
    import polars as pl

    schema = raw.schema
    ucol, tcol = schema.user_column, schema.time.column
    tables = dict(raw.tables)
    kept = {}
    for sc in schema.scenarios:
        frame = tables[sc.table]
        keep = (pl.col(tcol) >= schema.split.valid_start) | (pl.col(ucol) < users)
        tables[sc.table] = frame.filter(keep)
        kept[sc.name] = (len(tables[sc.table]), len(frame))
    print("training exposures of users < " + str(users) + ": " + ", ".join(
        f"{name} {k:,} of {n:,} rows kept" for name, (k, n) in kept.items()), flush=True)
    dropped = sum(n - k for k, n in kept.values())
    reason = f"training exposures of users >= {users} (--train-users)"
    return dataclasses.replace(raw, tables=tables, pre_dropped={**raw.pre_dropped, reason: dropped},
                               info={**raw.info, "train_users": users})


def _train_and_evaluate(args: argparse.Namespace, data: Path, run: Path, arch: str, seed: int,
                        scenarios: list[str] | None, drop_inputs: tuple[str, ...] = ()) -> dict:
    """Train one run (unless finished) and return its test metrics and training figures."""
    done = run / "eval_test.json"
    if not done.is_file():
        if run.exists():  # an interrupted run: start it again from scratch, it is cheap to redo
            import shutil

            shutil.rmtree(run)
        model = load_model_config(args.model).model_dump(mode="json") if arch == "mtfm" else {}
        settings = {"epochs": args.epochs, "lr": args.lr, "embedding_lr": args.embedding_lr} if arch == "mtfm" else {
            "epochs": args.lr_epochs, "lr": args.lr_baseline_lr}
        cfg = TrainConfig(**{**load_train_config(arch).model_dump(), **{k: v for k, v in settings.items() if v is not None},
                             "patience": args.patience, "batch_size": args.batch_size, "seed": seed, "progress": False,
                             "threads": args.threads})
        t0 = time.perf_counter()
        train_from_data(data, run, arch=arch, model_config=model, cfg=cfg, scenarios=scenarios, drop_inputs=drop_inputs)
        metrics, _ = evaluate_run(run, data, "test")
        write_json(run / "eval_test.json", metrics)
        print(f"  {run.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    train = json.loads((run / "metrics.json").read_text())
    return {"test": json.loads(done.read_text()), "train": train}


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _fmt(values: list[float | None], digits: int = 4, scale: float = 1.0) -> str:
    mean, std, n = _mean_std(values)
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _paired_bound(diffs: list[float]) -> float | None:
    """One-sided 95% lower bound of the mean paired difference (t distribution)."""
    if len(diffs) < 2:
        return None
    d = np.array(diffs)
    return float(d.mean() - stats.t.ppf(0.95, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))


def report(results: dict, scenarios: list[str], tasks: dict[str, list[str]], seeds: list[int], title: str) -> tuple[str, dict]:
    """Markdown tables and a JSON summary of every figure."""
    def metric(kind: str, seed: int, s: str, t: str, key: str):
        return results[kind][seed]["test"].get(s, {}).get(t, {}).get(key)

    summary: dict = {"seeds": seeds, "scenarios": {}}
    lines = [f"### {title}", "",
             "Test split; mean ± std over seeds " + ", ".join(map(str, seeds)) + ". "
             "`multi`: MTFM on all scenarios; `single`: the same MTFM on that scenario only; LR: logistic "
             "regression on the scenario's own features. Gap closed = (MTFM multi − LR) / (oracle − LR).", "",
             "| scenario | task | test exposures (pos.) | LR AUC | MTFM multi AUC | MTFM single AUC | oracle AUC | "
             "LR GAUC | MTFM multi GAUC | MTFM single GAUC | oracle GAUC | gap closed (multi), AUC | gap closed (multi), GAUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        summary["scenarios"][s] = {}
        for t in tasks[s]:
            first = results["multi"][seeds[0]]["test"][s][t]
            row: dict = {"exposures": first["exposures"], "positives": first["positives"]}
            for kind, key in (("lr", "lr"), ("multi", "multi"), (f"single-{s}", "single")):
                for m in ("auc", "gauc"):
                    row[f"{key}_{m}"] = [metric(kind, seed, s, t, m) if kind in results else None for seed in seeds]
            row["oracle_auc"], row["oracle_gauc"] = first.get("oracle_auc"), first.get("oracle_gauc")
            row["gap_closed"] = [gap_closed(a, b, row["oracle_gauc"]) for a, b in zip(row["multi_gauc"], row["lr_gauc"])]
            row["gap_closed_auc"] = [gap_closed(a, b, row["oracle_auc"]) for a, b in zip(row["multi_auc"], row["lr_auc"])]
            summary["scenarios"][s][t] = row
            oracle = lambda x: "-" if x is None else f"{x:.4f}"
            lines.append(
                f"| {s} | {t} | {row['exposures']} ({row['positives']}) | {_fmt(row['lr_auc'])} | {_fmt(row['multi_auc'])} | "
                f"{_fmt(row['single_auc'])} | {oracle(row['oracle_auc'])} | {_fmt(row['lr_gauc'])} | "
                f"{_fmt(row['multi_gauc'])} | {_fmt(row['single_gauc'])} | {oracle(row['oracle_gauc'])} | "
                f"{_fmt(row['gap_closed_auc'], 0, 100)}% | {_fmt(row['gap_closed'], 0, 100)}% |".replace("-%", "-"))
    lines += _lr_table(summary, scenarios, tasks)
    if not any(k.startswith("single-") for k in results):
        return _runs_table(results, seeds, lines, summary)
    lines += ["", "Multi-scenario minus single-scenario MTFM, paired by seed (positive: multi better); "
              "\"beyond noise\": the one-sided 95% t lower bound of the mean difference is above 0.", "",
              "| scenario | task | Δ AUC | Δ AUC lower bound | Δ GAUC | Δ GAUC lower bound | multi wins beyond noise (AUC / GAUC) |",
              "|---|---|---|---|---|---|---|"]
    for s in scenarios:
        for t in tasks[s]:
            row = summary["scenarios"][s][t]
            verdicts = []
            for m in ("auc", "gauc"):
                diffs = [a - b for a, b in zip(row[f"multi_{m}"], row[f"single_{m}"]) if a is not None and b is not None]
                row[f"delta_{m}"] = diffs
                row[f"delta_{m}_lower95"] = _paired_bound(diffs)
                verdicts.append(row[f"delta_{m}_lower95"] is not None and row[f"delta_{m}_lower95"] > 0)
            bound = lambda x: "-" if x is None else f"{x:+.4f}"
            lines.append(f"| {s} | {t} | {_fmt(row['delta_auc'])} | {bound(row['delta_auc_lower95'])} | "
                         f"{_fmt(row['delta_gauc'])} | {bound(row['delta_gauc_lower95'])} | "
                         f"{'yes' if verdicts[0] else 'no'} / {'yes' if verdicts[1] else 'no'} |")
    return _runs_table(results, seeds, lines, summary)


def _lr_table(summary: dict, scenarios: list[str], tasks: dict[str, list[str]]) -> list[str]:
    """MTFM multi minus LR, paired by seed, with its one-sided 95% t lower bound ("beats LR beyond noise")."""
    lines = ["", "MTFM multi minus LR, paired by seed (positive: MTFM better); \"beyond noise\": the one-sided "
             "95% t lower bound of the mean difference is above 0.", "",
             "| scenario | task | Δ AUC | Δ AUC lower bound | Δ GAUC | Δ GAUC lower bound | MTFM beats LR beyond noise (AUC / GAUC) |",
             "|---|---|---|---|---|---|---|"]
    for s in scenarios:
        for t in tasks[s]:
            row = summary["scenarios"][s][t]
            verdicts, cells = [], []
            for m in ("auc", "gauc"):
                diffs = [a - b for a, b in zip(row[f"multi_{m}"], row[f"lr_{m}"]) if a is not None and b is not None]
                bound = _paired_bound(diffs)
                row[f"vs_lr_{m}"], row[f"vs_lr_{m}_lower95"] = diffs, bound
                verdicts.append(bound is not None and bound > 0)
                cells += [_fmt(diffs), "-" if bound is None else f"{bound:+.4f}"]
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + f" | {'yes' if verdicts[0] else 'no'} / "
                         f"{'yes' if verdicts[1] else 'no'} |")
    return lines


def _runs_table(results: dict, seeds: list[int], lines: list[str], summary: dict) -> tuple[str, dict]:
    lines += ["", "Training runs (mean over seeds): epochs run, the epoch each scenario was scored from (its best "
              "valid GAUC), train samples, throughput of `mtfm train` (loader + steps, this shared 2-core machine).", "",
              "| run | epochs run | best epoch per scenario | train samples | exposures/s | tokens/s | seconds |",
              "|---|---|---|---|---|---|---|"]
    for kind in results:
        trains = [results[kind][seed]["train"] for seed in seeds]
        tp = [tr["throughput"] for tr in trains]
        best = {s: np.mean([tr["best_by_scenario"][s]["epoch"] for tr in trains]) for s in trains[0]["best_by_scenario"]}
        lines.append(
            f"| {kind} | {np.mean([tr['epochs_completed'] for tr in trains]):.1f} | "
            f"{', '.join(f'{s} {e:.1f}' for s, e in best.items())} | "
            f"{trains[0]['data']['train_samples']:,} | {np.mean([x['exposures_per_s'] for x in tp]):,.0f} | "
            f"{np.mean([x['tokens_per_s'] for x in tp]):,.0f} | {np.mean([x['train_seconds'] for x in tp]):.0f} |")
        summary.setdefault("runs", {})[kind] = {"throughput": tp, "epochs": [tr["epochs_completed"] for tr in trains]}
    return "\n".join(lines), summary


def ablation_table(results: dict, scenarios: list[str], tasks: dict[str, list[str]], seeds: list[int]) -> str:
    """What each kind of input contributes: GAUC of the full multi-scenario MTFM minus the same
    model trained without that input (paired by seed; positive: the input helps)."""
    ablated = [k for k in results if k.startswith("no-")]
    lines = ["Input ablations: test GAUC of MTFM multi minus MTFM multi trained without the input, paired by seed "
             "(mean ± std; positive: the input helps); the one-sided 95% t lower bound in brackets.", "",
             "| scenario | task | " + " | ".join(f"without {k[len('no-'):]}" for k in ablated) + " |",
             "|---|---|" + "---|" * len(ablated)]
    for s in scenarios:
        for t in tasks[s]:
            cells = []
            for kind in ablated:
                diffs = [results["multi"][seed]["test"][s][t]["gauc"] - results[kind][seed]["test"][s][t]["gauc"]
                         for seed in seeds
                         if results["multi"][seed]["test"][s][t]["gauc"] is not None
                         and results[kind][seed]["test"][s][t]["gauc"] is not None]
                bound = _paired_bound(diffs)
                cells.append(f"{_fmt(diffs)}" + (f" [{bound:+.4f}]" if bound is not None else ""))
            lines.append(f"| {s} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_table(out: Path, data: Path, seeds: list[int], exposures: int) -> tuple[str, dict]:
    """Signal-recovery probes (mtfm.train.probes) of each seed's multi run, mean ± std over seeds
    of the per-seed mean logit change."""
    from mtfm.train.probes import results_json, run_probes

    per_seed = {}
    for seed in seeds:
        path = out / f"seed{seed}" / "multi" / "diagnose.json"
        if not path.is_file():
            write_json(path, results_json(run_probes(path.parent, data, exposures=exposures)))
        per_seed[seed] = json.loads(path.read_text())
    keys = [(r["scenario"], r["probe"], r["true_change"]) for r in per_seed[seeds[0]]]
    lines = [f"Signal-recovery probes of MTFM multi ({exposures} test exposures per scenario and seed; model change: "
             "mean ± std over seeds of the mean ctr-logit change; `mtfm diagnose`).", "",
             "| scenario | probe (one click inserted) | true change | model change | share of true |", "|---|---|---|---|---|"]
    summary = {}
    for i, (s, name, truth) in enumerate(keys):
        means = [per_seed[seed][i]["mean"] for seed in seeds]
        share = f"{np.mean(means) / truth:.0%}" if truth else "-"
        lines.append(f"| {s} | {name} | {truth:+.2f} | {_fmt(means, 3)} | {share} |")
        summary[f"{s}: {name}"] = {"true": truth, "means": means}
    return "\n".join(lines), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    p.add_argument("--path", default=None, help="MovieLens-100K directory (default: the source's)")
    p.add_argument("--users", type=int, default=3000, help="synthetic users (world seed 0)")
    p.add_argument("--valid-days", type=int, default=1, help="synthetic: exposure days in the valid split (schema: 1)")
    p.add_argument("--test-days", type=int, default=1,
                   help="synthetic: last exposure days in the test split (schema: 1); more days give the small "
                        "scenario more test positives for the same training cost")
    p.add_argument("--train-users", type=int, default=None, metavar="N",
                   help="synthetic: keep the training exposures of users 0..N-1 only (valid / test keep all "
                        "--users users): nested training sets over one fixed test set, for a learning curve")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="directory for the data, the runs and the report")
    p.add_argument("--model", default="small", help="MTFM model config or preset")
    p.add_argument("--epochs", type=int, default=None,
                   help="MTFM max epochs (default: the preset's; early stopping on valid GAUC)")
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (default 1: this machine's 2 cores are shared)")
    p.add_argument("--lr", type=float, default=None, help="MTFM dense learning rate (default: the mtfm training preset's)")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="MTFM embedding tables' learning rate (default: the mtfm training preset's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-ablations", action="store_true",
                   help="also train MTFM without each kind of input (history, realtime, cross features) and report "
                        "what each contributes (multi minus the ablated run, paired by seed)")
    p.add_argument("--no-singles", action="store_true",
                   help="skip the single-scenario runs (MTFM multi and LR only: the learning curve's comparison)")
    p.add_argument("--probes", type=int, default=0, metavar="N",
                   help="synthetic: also run the signal-recovery probes on N test exposures per scenario of each "
                        "seed's multi run (mtfm diagnose) and report them")
    p.add_argument("--lr-epochs", type=int, default=20, help="LR baseline max epochs (early stopping on valid GAUC)")
    p.add_argument("--lr-baseline-lr", type=float, default=None, help="LR baseline lr (default: the logistic preset's)")
    args = p.parse_args()

    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    _prepare(args, data)
    schema = read_manifest(data).schema_obj
    scenarios, tasks = schema.scenario_names, {s.name: s.task_names for s in schema.scenarios}
    kinds = ["multi", *([] if args.no_singles else [f"single-{s}" for s in scenarios]), "lr"]
    kinds += [f"no-{k}" for k in INPUT_KINDS] if args.input_ablations else []
    results: dict = {k: {} for k in kinds}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        for kind in kinds:
            arch = "logistic" if kind == "lr" else "mtfm"
            only = [kind[len("single-"):]] if kind.startswith("single-") else None
            drop = (kind[len("no-"):],) if kind.startswith("no-") else ()
            results[kind][seed] = _train_and_evaluate(args, data, out / f"seed{seed}" / kind, arch, seed, only, drop)
    title = f"{args.dataset}" + (f" ({args.users} users, world seed 0; valid: {args.valid_days} day(s), test: the last "
                                 f"{args.test_days} day(s))" if args.dataset == "synthetic" else "")
    if args.train_users is not None:
        title += f"; training exposures of users 0..{args.train_users - 1} only"
    text, summary = report(results, scenarios, tasks, args.seeds, title)
    if args.input_ablations:
        text += "\n\n" + ablation_table(results, scenarios, tasks, args.seeds)
    if args.probes:
        probes_text, summary["probes"] = probe_table(out, data, args.seeds, args.probes)
        text += "\n\n" + probes_text
    summary["config"] = vars(args)
    summary["wall_seconds"] = time.perf_counter() - t0
    (out / "report.md").write_text(text + "\n")
    write_json(out / "report.json", summary)
    print(text)
    print(f"\nwrote {out}/report.md and report.json ({summary['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
