"""What each addition to the paper's architecture buys: MTFM multi-scenario runs on one prepared
dataset, the plain paper architecture (the ``small`` preset: nothing switched on that the paper
does not have) against the same model with one opt-in addition, over several seeds.

Additions measured (``mtfm.model.config.ModelConfig`` options marked ADDITION):

* ``time_bias``: learned relative time bias per head (HSTU's);
* ``position_bias``: learned relative position bias, gaps counted over the keys a query sees;
* ``final_norm``: a Group LayerNorm on the final T-tokens before the MMoE;
* ``time_bias+final_norm`` (only with ``--variants``): both, what the presets held before issue 9.

Runs share the layout of ``run_experiments.py`` (``OUT/seed<S>/<variant>``); the plain variant
is that campaign's ``multi`` run, reused when it already exists, so point ``--out`` at the same
directory with the same training options. Prints and writes ``OUT/ablation.md`` / ``.json``:
AUC and GAUC per scenario and task (mean +- std over seeds) and the paired difference to the
plain model with a one-sided 95% t-bound in each direction.

    python benchmarks/run_preset_ablation.py --dataset synthetic --users 6000 --valid-days 2 --test-days 3 --out runs/exp/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_experiments as exp  # noqa: E402  (the campaign's data preparation and training)

from mtfm.data.store import read_manifest  # noqa: E402
from mtfm.model.config import load_model_config  # noqa: E402
from mtfm.train.checkpoint import write_json  # noqa: E402

VARIANTS: dict[str, dict] = {
    "multi": {},  # the plain paper architecture (same name as run_experiments' run: reused)
    "time_bias": {"relative_time_bias": True},
    "position_bias": {"relative_position_bias": True},
    "final_norm": {"final_norm": True},
    "time_bias+final_norm": {"relative_time_bias": True, "final_norm": True},
}
DEFAULT_VARIANTS = ["time_bias", "position_bias", "final_norm"]


def _variant_config(base: str, changes: dict, path: Path) -> str:
    """Write the base preset with ``changes`` applied to ``path``; return the path (a --model value)."""
    config = load_model_config(base).model_copy(update=changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return str(path)


def _claim(run: Path) -> bool:
    """Take ``run`` for this process (an exclusive claim file beside it); False if another has it."""
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run.parent / f"{run.name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _rows(results: dict, scenarios: list[str], tasks: dict[str, list[str]], seeds: list[int],
          variants: list[str]) -> tuple[str, list]:
    lines = ["| scenario | task | variant | AUC | GAUC | Δ AUC vs plain | Δ AUC bounds (95%, one-sided) | "
             "Δ GAUC vs plain | Δ GAUC bounds (95%, one-sided) |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []

    def metric(variant: str, seed: int, s: str, t: str, key: str):
        return results[variant][seed]["test"].get(s, {}).get(t, {}).get(key)

    for s in scenarios:
        for t in tasks[s]:
            for variant in variants:
                row = {"scenario": s, "task": t, "variant": variant}
                cells = []
                for key in ("auc", "gauc"):
                    values = [metric(variant, seed, s, t, key) for seed in seeds]
                    row[key] = values
                    cells.append(exp._fmt(values))
                deltas = []
                for key in ("auc", "gauc"):
                    if variant == "multi":
                        deltas += ["-", "-"]
                        continue
                    diffs = [a - b for a, b in zip(row[key], [metric("multi", seed, s, t, key) for seed in seeds])
                             if a is not None and b is not None]
                    row[f"delta_{key}"] = diffs
                    lower = exp._paired_bound(diffs)
                    upper = -exp._paired_bound([-d for d in diffs]) if lower is not None else None
                    deltas += [exp._fmt(diffs), "-" if lower is None else f"[{lower:+.4f}, {upper:+.4f}]"]
                name = "plain (paper)" if variant == "multi" else f"+ {variant}"
                lines.append(f"| {s} | {t} | {name} | {cells[0]} | {cells[1]} | {deltas[0]} | {deltas[1]} | "
                             f"{deltas[2]} | {deltas[3]} |")
                rows.append(row)
    return "\n".join(lines), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    p.add_argument("--path", default=None)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--valid-days", type=int, default=1)
    p.add_argument("--test-days", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="small", help="the plain preset the additions are added to")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--patience", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "multi"], default=DEFAULT_VARIANTS)
    p.add_argument("--wait-for-data", type=float, default=0.0,
                   help="seconds to wait for OUT/data/manifest.json written by a concurrent run_experiments.py "
                        "(0: prepare it here if missing)")
    args = p.parse_args()

    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()
    deadline = time.time() + args.wait_for_data
    while not (data / "manifest.json").is_file() and time.time() < deadline:
        time.sleep(10)
    exp._prepare(args, data)
    schema = read_manifest(data).schema_obj
    scenarios, tasks = schema.scenario_names, {s.name: s.task_names for s in schema.scenarios}
    variants = {"multi": VARIANTS["multi"], **{v: VARIANTS[v] for v in args.variants}}
    results: dict = {v: {} for v in variants}
    # Several of these processes may share OUT (each takes a run by creating its claim file);
    # the plain runs are left to a concurrent run_experiments.py (same directory and options)
    # when --wait-for-data is given: their eval_test.json is awaited, not trained twice.
    pending = [(seed, v) for seed in args.seeds for v in variants if v != "multi"]
    pending += [(seed, "multi") for seed in args.seeds]
    while pending:
        progressed = False
        for seed, variant in list(pending):
            run = out / f"seed{seed}" / variant
            done = (run / "eval_test.json").is_file()
            wait_plain = variant == "multi" and args.wait_for_data and time.time() < deadline + 7200
            if not done and (wait_plain or not _claim(run)):
                continue  # another process trains it
            run_args = argparse.Namespace(**vars(args))
            run_args.model = _variant_config(args.model, VARIANTS[variant], out / "configs" / f"{variant}.yaml")
            print(f"seed {seed} {variant}", flush=True)
            results[variant][seed] = exp._train_and_evaluate(run_args, data, run, "mtfm", seed, None)
            pending.remove((seed, variant))
            progressed = True
        if pending and not progressed:
            time.sleep(20)
    table, rows = _rows(results, scenarios, tasks, args.seeds, list(variants))
    text = (f"Additions to the paper's architecture ({args.model} preset), {args.dataset}, seeds {args.seeds}; "
            f"test split, each run scored per scenario from its best valid epoch. Δ: variant minus plain, paired by "
            f"seed (mean ± std) and its one-sided 95% t-bounds (lower, upper): an addition helps beyond seed noise "
            f"when the lower bound is above 0, hurts when the upper bound is below 0.\n\n{table}")
    name = "ablation" if args.variants == DEFAULT_VARIANTS else "ablation-" + "-".join(args.variants)
    (out / f"{name}.md").write_text(text + "\n")
    write_json(out / f"{name}.json", {"rows": rows, "config": vars(args), "wall_seconds": time.perf_counter() - t0})
    print(text)


if __name__ == "__main__":
    main()
