"""``mtfm explain``: attention heatmaps of a trained MTFM run (mtfm.explain)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtfm.explain.run import CHECKPOINT_CHOICES, RESULT_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="attention heatmaps: which behaviour each scenario's exposures attend to",
        description="Rebuild the run's model on the reference attention backend, score users of a split and "
        "write heatmaps of the attention scores of T-tokens (rows: their scenario) over H- and R-tokens grouped "
        "by source scenario, sequence type, age of the action and same / other item attribute, per layer "
        f"(averaged over heads) and over layers: PNGs and the plotted matrices in OUT/{RESULT_NAME}.")
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train` (arch mtfm)")
    p.add_argument("--data", metavar="DIR", required=True, help="the prepared data the run was trained on")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory (refused if it exists and is not "
                   "empty, unless --overwrite)")
    p.add_argument("--split", default="test", help="split to read (default test)")
    p.add_argument("--users", type=int, default=256, help="users drawn at random for the block-wise average "
                   "(default 256; 0: only --user)")
    p.add_argument("--user", type=int, default=None, help="also explain this one user id (its own heatmaps)")
    p.add_argument("--seed", type=int, default=0, help="which users are drawn")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best-overall")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--source-feature", default="scenario", help="behaviour feature naming the source scenario of "
                   "an action (default scenario; the source view is left out when the sequences lack it)")
    p.add_argument("--match-feature", default="cuisine", help="feature compared between an exposure's item and "
                   "each action (default cuisine; left out when not shared)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier explain output in --out")
    p.add_argument("--allow-other-data", action="store_true",
                   help="explain on data other than the run's (its fingerprint differs) with a warning")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mtfm.explain.run import ExplainOptions, explain_run, format_summary

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    opts = ExplainOptions(
        run=Path(args.run), data=Path(args.data), out=Path(args.out), split=args.split, users=args.users,
        user=args.user, seed=args.seed, checkpoint=args.checkpoint, batch_size=args.batch_size,
        source_feature=args.source_feature or None, match_feature=args.match_feature or None,
        overwrite=args.overwrite, allow_other_data=args.allow_other_data)
    result = explain_run(opts).result
    for scope in result["scopes"]:
        print(format_summary(result, scope))
        print()
    print(f"wrote {Path(args.out) / RESULT_NAME} and {len(result['plots'])} PNG heatmaps in {args.out}")
    return 0
