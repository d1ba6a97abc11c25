"""``mtfm evaluate``: score a trained run on a split; print the table, write RUN/eval_<split>.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtfm.train.checkpoint import write_json
from mtfm.train.evaluate import CHECKPOINT_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="AUC / GAUC / logloss per scenario and task of a trained run, beside the oracle",
        description="Score RUN's best checkpoint (by the run's valid selection score, `mtfm train --select`; "
        "default GAUC) on a split of DIR and write "
        "RUN/eval_<split>.json as {scenario: {task: {auc, gauc, logloss, exposures, positives, users_scored, "
        "users_skipped_single_class, oracle_auc, oracle_gauc, ...}}} (oracle_* when the data knows the true "
        "probabilities). GAUC: per-user AUC weighted by the user's exposures; users with one class only are "
        "skipped and counted.")
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train`")
    p.add_argument("--data", metavar="DIR", required=True, help="prepared data directory")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="best (default): each scenario from its own best epoch by the run's selection (`mtfm train "
                        "--select`, default valid GAUC); best-overall: the epoch with the best overall selection score; "
                        "last: the latest checkpoint")
    p.add_argument("--baseline", metavar="RUN", default=None,
                   help="another run (e.g. --arch logistic) to show beside, with the share of its gap to the oracle closed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: score under bf16 autocast (inference option; see BENCHMARKS.md for its AUC/GAUC delta)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="score although DIR is not the data RUN was trained on (its manifest fingerprint differs); "
                        "refused without this flag")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtfm.train.evaluate import evaluate_run, format_table

    metrics, chosen = evaluate_run(args.run, args.data, args.split, checkpoint=args.checkpoint,
                                   batch_size=args.batch_size, allow_other_data=args.allow_other_data,
                                   precision=args.precision)
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"  # the fp32 reference is not overwritten
    out = Path(args.run) / f"eval_{args.split}{suffix}.json"
    write_json(out, metrics)
    baseline = None
    if args.baseline is not None:
        baseline, _ = evaluate_run(args.baseline, args.data, args.split, checkpoint=args.checkpoint,
                                   batch_size=args.batch_size, allow_other_data=args.allow_other_data)
        write_json(Path(args.baseline) / f"eval_{args.split}.json", baseline)
    print(f"{args.split} split of {args.data}; checkpoints ({args.checkpoint}): "
          + ", ".join(f"{s} <- {p.name}" for s, p in chosen.items()) + "\n")
    print(format_table(metrics, baseline))
    print(f"\nwrote {out}")
    return 0
