"""``mtfm bench``: benchmarks that belong to the library. ``mtfm bench hta``: the HTA ablation of
paper Table 3 with accuracy (:mod:`mtfm.bench.hta`); ``mtfm bench scaling``: the scaling study of
paper Figure 4 (:mod:`mtfm.bench.scaling`). The work is in those modules; this one only parses."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtfm.bench.hta import DEFAULT_CONFIGS, REFERENCE_LAYERS, REPORT, AblationOptions, WorldOptions

HTA_DESCRIPTION = f"""\
Train the small preset with each (K:P)xB stack of paper Table 3 on one synthetic world with long
behaviour logs (same data, seeds and budget), score the test split and print one row per config:
AUC / GAUC per scenario, mean GAUC, its change against full attention, training exposures/s and
samples/s, speed-up and peak memory. Writes OUT/{REPORT} and OUT/hta_ablation.json (per-seed raw
numbers), the prepared world (OUT/data, unless --data) and the runs (OUT/runs).

Configs are given at {REFERENCE_LAYERS} layers as '(K:P)xB [kv=G|kv=H] [batch=M]' (kv=H: no GQA;
batch=M: M times the batch, the same samples) and scaled to --layers: a one-block stack scales its
layers ((0:16)x1 -> (0:L)x1), a multi-block stack its blocks (max(1, round(B*L/16)): at --layers 4,
(1:1)x8 -> (1:1)x2, (3:1)x4 -> (3:1)x1, (5:1)x3 -> (5:1)x1)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks of the library (hta: the HTA ablation of paper Table 3; "
                                            "scaling: the scaling study of paper Figure 4)")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    hta = sub.add_parser("hta", help="HTA ablation with accuracy (paper Table 3)", description=HTA_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    hta.add_argument("--out", metavar="DIR", required=True, help="output directory (refused if it exists)")
    hta.add_argument("--overwrite", action="store_true", help="replace an earlier ablation's output in DIR")
    hta.add_argument("--configs", metavar="SPEC", nargs="+", default=list(DEFAULT_CONFIGS),
                     help=f"configs at {REFERENCE_LAYERS} layers (default: paper Table 3: "
                          + ", ".join(f"'{c}'" for c in DEFAULT_CONFIGS) + ")")
    hta.add_argument("--layers", metavar="L", type=int, default=REFERENCE_LAYERS,
                     help=f"scale every config to L layers (default {REFERENCE_LAYERS}; see above)")
    hta.add_argument("--seeds", metavar="S", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    hta.add_argument("--epochs", type=int, default=1, help="training epochs of every run (default 1)")
    hta.add_argument("--max-steps", metavar="N", type=int, default=None,
                     help="stop every run after N steps of --batch-size samples (a batch=M config: N/M steps)")
    hta.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    hta.add_argument("--model", default="small", help="model preset or file every config overrides (default small)")
    hta.add_argument("--heads", type=int, default=None, help="query heads (default: the preset's)")
    hta.add_argument("--task", default="ctr", help="the task the table shows (default ctr; the JSON has all)")
    hta.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    hta.add_argument("--data", metavar="DIR", default=None,
                     help="a prepared world to use instead of generating one (the world options are then ignored)")
    w = WorldOptions()
    world = hta.add_argument_group("synthetic world (without --data)")
    world.add_argument("--users", type=int, default=w.users, help=f"default {w.users}")
    world.add_argument("--world-seed", type=int, default=w.seed, help=f"default {w.seed}")
    world.add_argument("--days", type=int, default=w.days, help=f"exposure days (default {w.days})")
    world.add_argument("--history-days", type=int, default=w.history_days,
                       help=f"behaviour-only days before them (default {w.history_days})")
    world.add_argument("--history-max-len", type=int, default=w.history_max_len,
                       help=f"cap of each history type (default {w.history_max_len})")
    world.add_argument("--realtime-max-len", type=int, default=w.realtime_max_len,
                       help=f"cap of the real-time type (default {w.realtime_max_len})")
    hta.add_argument("--in-process", action="store_true",
                     help="run every training in this process (faster start; peak memory is then not measured)")
    hta.add_argument("--quiet", action="store_true", help="no progress lines")
    hta.set_defaults(func=run_hta)
    _add_scaling(sub)


def options_from_args(args: argparse.Namespace) -> AblationOptions:
    """The parsed command line as :class:`AblationOptions`."""
    world = WorldOptions(users=args.users, seed=args.world_seed, days=args.days, history_days=args.history_days,
                         history_max_len=args.history_max_len, realtime_max_len=args.realtime_max_len)
    return AblationOptions(
        out=Path(args.out), configs=args.configs, layers=args.layers, seeds=args.seeds, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, model=args.model, heads=args.heads, task=args.task,
        threads=args.threads, data=Path(args.data) if args.data else None, world=world, overwrite=args.overwrite,
        quiet=args.quiet, isolate=not args.in_process)


def run_hta(args: argparse.Namespace) -> int:
    from mtfm.bench.hta import run_ablation

    report, _ = run_ablation(options_from_args(args))
    print(report)
    print(f"\nwrote {Path(args.out) / REPORT} and {Path(args.out) / 'hta_ablation.json'}")
    return 0


SCALING_DESCRIPTION = f"""\
The scaling study of paper Figure 4 on one synthetic world (same data, seed and budget for every model).
Figure 4a: MTFM at each --widths (d_model W, tokenizer hidden 2W, head experts 2W -> W) against its
inference FLOPs per exposure (mtfm.model.flops), beside MMoE at matched FLOPs. Figure 4b: every MTFM
run checkpoints --curve-points times along one pass over the shuffled train split at a constant lr
(the checkpoint after k steps is a model trained on a random k/steps share of the data) and the
smallest scenario's test GAUC is read against training tokens seen. GAUC noise: a paired user
bootstrap; slopes per decade with their sd and a verdict (rises / flat within noise / falls), and
whether the gap between the largest and smallest width widens with data.
Writes OUT/{{SCALING_REPORT}}, OUT/scaling.json, scaling_size.csv/.png, scaling_data.csv/.png, the
prepared world (OUT/data, unless --data) and the runs (OUT/runs).
Budget on 2 cores (default world, widths and --workers 2): about 1.5 hours."""


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    from mtfm.bench.scaling import DEFAULT_WIDTHS, REPORT as SCALING_REPORT, ScalingWorld

    sc = sub.add_parser("scaling", help="scaling study: GAUC against model size and training data (paper Figure 4)",
                        description=SCALING_DESCRIPTION.replace("{SCALING_REPORT}", SCALING_REPORT),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("--out", metavar="DIR", required=True, help="output directory (refused if it exists)")
    sc.add_argument("--overwrite", action="store_true", help="replace an earlier study's output in DIR")
    sc.add_argument("--widths", metavar="W", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                    help="MTFM d_model of each size (default " + " ".join(map(str, DEFAULT_WIDTHS)) + ")")
    sc.add_argument("--no-mmoe", action="store_true", help="leave out MMoE at matched FLOPs")
    sc.add_argument("--curve-points", metavar="K", type=int, default=8,
                    help="checkpoints along training scored for the data curve (default 8)")
    sc.add_argument("--curve-scenario", metavar="S", default=None,
                    help="the scenario of the data curve (default: the one with the fewest training exposures)")
    sc.add_argument("--epochs", type=int, default=1, help="passes over the train split (default 1: continual training)")
    sc.add_argument("--max-steps", metavar="N", type=int, default=None, help="stop every run after N steps")
    sc.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    sc.add_argument("--seed", type=int, default=0, help="training seed of every run (default 0)")
    sc.add_argument("--model", default="small", help="model preset or file the widths scale (default small)")
    sc.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    sc.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    sc.add_argument("--bootstrap", metavar="B", type=int, default=200, help="user-bootstrap draws (default 200)")
    sc.add_argument("--data", metavar="DIR", default=None,
                    help="a prepared world to use instead of generating one (the world options are then ignored)")
    w = ScalingWorld()
    world = sc.add_argument_group("synthetic world (without --data)")
    world.add_argument("--users", type=int, default=w.users, help=f"default {w.users}")
    world.add_argument("--world-seed", type=int, default=w.seed, help=f"default {w.seed}")
    world.add_argument("--days", type=int, default=w.days, help=f"exposure days (default {w.days})")
    world.add_argument("--valid-days", type=int, default=w.valid_days, help=f"default {w.valid_days}")
    world.add_argument("--test-days", type=int, default=w.test_days, help=f"default {w.test_days}")
    world.add_argument("--scenario-shares", metavar="A,B,...", default=",".join(f"{x:g}" for x in w.scenario_shares),
                       help="exposure volume per scenario (HP, PHF, SQS, ...; default "
                            + ",".join(f"{x:g}" for x in w.scenario_shares) + ": SQS larger than prepare's 8,7,1, "
                            "so its CTCVR GAUC is read over hundreds of positives)")
    sc.add_argument("--quiet", action="store_true", help="no progress lines")
    sc.set_defaults(func=run_scaling)


def scaling_options_from_args(args: argparse.Namespace):
    """The parsed command line as :class:`mtfm.bench.scaling.ScalingOptions`."""
    from mtfm.bench.scaling import ScalingOptions, ScalingWorld

    try:
        shares = tuple(float(x) for x in args.scenario_shares.split(","))
    except ValueError:
        raise ValueError(f"--scenario-shares: expected comma-separated numbers, got {args.scenario_shares!r}") from None
    world = ScalingWorld(users=args.users, seed=args.world_seed, days=args.days, valid_days=args.valid_days,
                         test_days=args.test_days, scenario_shares=shares)
    return ScalingOptions(
        out=Path(args.out), widths=args.widths, mmoe=not args.no_mmoe, curve_points=args.curve_points,
        curve_scenario=args.curve_scenario, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        seed=args.seed, model=args.model, threads=args.threads, workers=args.workers, bootstrap=args.bootstrap,
        data=Path(args.data) if args.data else None, world=world, overwrite=args.overwrite, quiet=args.quiet)


def run_scaling(args: argparse.Namespace) -> int:
    from mtfm.bench.scaling import MARKER, REPORT, run_study

    report, _ = run_study(scaling_options_from_args(args))
    print(report)
    print(f"\nwrote {Path(args.out) / REPORT}, {Path(args.out) / MARKER} and the plots beside them")
    return 0
