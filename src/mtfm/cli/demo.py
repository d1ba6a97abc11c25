"""``mtfm demo``: the README's main job, end to end on one machine in a few minutes.

generate (or read MovieLens) -> ``mtfm prepare`` -> train MTFM -> train the logistic-regression
baseline -> evaluate both on the test split -> print the per-scenario table beside the oracle
ceiling, with the share of the LR -> oracle AUC and GAUC gaps that MTFM closes. Every step is a library
call that the separate subcommands also make.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import time
from pathlib import Path

from mtfm.dirlock import hold_dir_lock
from mtfm.train.checkpoint import write_json
from mtfm.train.config import TrainConfig, load_train_config

MARKER = ".mtfm-demo"  # only a directory holding this is ever cleared by the demo

# Chosen so that the synthetic demo takes about 3-5 minutes on 2 CPU cores. Training: the arch's
# preset (src/mtfm/configs/train_<arch>.yaml) plus these overrides. MovieLens keeps the settings
# measured on it (1.7k samples: 8 epochs at one lr of 1e-3 for every parameter).
DEFAULTS = {
    "synthetic": {"users": 4000, "train": {}},
    "movielens": {"users": None, "train": {"epochs": 8, "lr": 1e-3, "embedding_optimizer": "shared",
                                           "embedding_lr": None}},
}


def settings_epilog() -> str:
    """What the demo trains with, read from the packaged preset files when help is built."""
    from mtfm.cli.presets import defaults_line, model_preset_line, train_preset_line

    def overrides(train: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in train.items()) or "none"

    return "\n".join([
        "settings (read from the packaged presets, src/mtfm/configs/):",
        f"  MTFM model (--model, default small): {model_preset_line('small')}",
        f"  MTFM training: preset {train_preset_line('mtfm')}",
        f"    demo overrides: synthetic ({DEFAULTS['synthetic']['users']} users): "
        f"{overrides(DEFAULTS['synthetic']['train'])}; movielens: {overrides(DEFAULTS['movielens']['train'])}",
        f"  LR baseline (--arch logistic): preset {train_preset_line('logistic')}",
        f"  {defaults_line()}",
        "  `mtfm train --help` lists every preset; --epochs / --max-steps / --seed / --threads override them.",
    ])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="generate -> prepare -> train MTFM and LR -> evaluate, printing the table beside the oracle",
        description=__doc__, epilog=settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=tuple(DEFAULTS), default="synthetic",
                   help="synthetic world (default; has the oracle ceiling) or MovieLens-100K")
    p.add_argument("--path", metavar="P", default=None,
                   help="MovieLens-100K directory (default ../shared/data/movielens-100k or $MTFM_MOVIELENS_PATH)")
    p.add_argument("--users", metavar="N", type=int, default=None, help="synthetic users (default 4000)")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="seed of the world and of training")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--model", metavar="YAML", default="small", help="MTFM model config or preset (default small)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="MTFM epochs (default: the preset's; see below)")
    budget.add_argument("--max-steps", type=int, default=None, help="MTFM optimizer steps instead of epochs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one core less than the machine has, for the loader)")
    p.add_argument("--no-baseline", action="store_true", help="skip the logistic-regression baseline")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _fresh_out_dir(out: Path) -> None:
    """Create ``out``, or clear it if an earlier demo made it; never clear anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"{out}: exists, is not empty and was not made by `mtfm demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `mtfm demo`; the next demo run with this --out replaces this directory\n")


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from mtfm.model.config import load_model_config

    start = time.perf_counter()
    out = Path(args.out)
    model_config = load_model_config(args.model).model_dump(mode="json")  # a bad config fails before any work
    with hold_dir_lock(out, "mtfm demo"):  # a second demo into --out fails at once instead of clearing it
        return _run_locked(args, out, model_config, start)


def _run_locked(args: argparse.Namespace, out: Path, model_config: dict, start: float) -> int:
    from mtfm.data.aggregate import prepare
    from mtfm.data.store import format_summary
    from mtfm.train.evaluate import evaluate_run, format_table
    from mtfm.train.trainer import train_from_data

    defaults = DEFAULTS[args.dataset]
    _fresh_out_dir(out)
    data, mtfm_run, lr_run = out / "data", out / "mtfm", out / "lr"
    timings: dict[str, float] = {}

    t = _stage(f"prepare: {args.dataset} -> {data}")
    source = importlib.import_module(f"mtfm.data.sources.{args.dataset}")
    users = args.users if args.users is not None else defaults["users"]
    raw = source.load_source(args.path, None, users, args.seed)
    manifest = prepare(raw, data, progress=not args.quiet)
    print(format_summary(manifest))
    timings["prepare_s"] = time.perf_counter() - t

    preset = {**load_train_config("mtfm").model_dump(), **defaults["train"]}
    budget = {"max_steps": args.max_steps, "epochs": 1_000_000} if args.max_steps else {
        "epochs": args.epochs or preset["epochs"]}
    cfg = TrainConfig(**{**preset, "seed": args.seed, "progress": not args.quiet, "threads": args.threads, **budget})
    t = _stage(f"train MTFM ({cfg.epochs if not args.max_steps else args.max_steps} "
               f"{'epochs' if not args.max_steps else 'steps'}, lr {cfg.lr}) -> {mtfm_run}")
    result = train_from_data(data, mtfm_run, arch="mtfm", model_config=model_config, cfg=cfg)
    _print_history(result.metrics)
    timings["train_mtfm_s"] = time.perf_counter() - t

    baseline = None
    if not args.no_baseline:
        t = _stage(f"train the logistic-regression baseline -> {lr_run}")
        lr_cfg = TrainConfig(**{**load_train_config("logistic").model_dump(), "seed": args.seed,
                                "progress": not args.quiet, "threads": args.threads})
        _print_history(train_from_data(data, lr_run, arch="logistic", model_config={}, cfg=lr_cfg).metrics)
        timings["train_lr_s"] = time.perf_counter() - t

    t = _stage("evaluate on the test split")
    metrics, chosen = evaluate_run(mtfm_run, data, "test")
    write_json(mtfm_run / "eval_test.json", metrics)
    if not args.no_baseline:
        baseline, _ = evaluate_run(lr_run, data, "test")
        write_json(lr_run / "eval_test.json", baseline)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    print("\nMTFM (" + ", ".join(f"{s} from {p.name}" for s, p in chosen.items()) + f") on the test split of {data}"
          + (", beside the logistic-regression baseline (LR)" if baseline else "")
          + (" and the oracle (true probabilities)" if manifest.oracle else "") + ":\n")
    print(format_table(metrics, baseline))
    write_json(out / "timings.json", timings)
    print("\n" + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    print(f"wrote {mtfm_run}/eval_test.json" + (f", {lr_run}/eval_test.json" if baseline else "") + f", {out}/timings.json")
    return 0


def _print_history(metrics: dict) -> None:
    for h in metrics["history"]:
        score = h["valid_mean_gauc"]
        print(f"  epoch {h['epoch']}: train loss {h['train_loss']:.4f}, valid mean GAUC "
              f"{'-' if score is None else f'{score:.4f}'}")
    tp = metrics["throughput"]
    if tp["exposures_per_s"]:
        print(f"  {metrics['steps']} steps, {tp['exposures_per_s']:,.0f} exposures/s, {tp['tokens_per_s']:,.0f} tokens/s, "
              f"stopped by {metrics['status']}")
