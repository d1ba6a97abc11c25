"""``mtfm diagnose``: signal-recovery probes of a trained run on a synthetic world (mtfm.train.probes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtfm.train.evaluate import CHECKPOINT_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose", help="did a run learn the synthetic world's planted effects? counterfactual probes with known truth",
        description="On test exposures of a synthetic world whose real-time boost is off, insert one click into the "
        "user's behaviour log (same cuisine 10 min before, in search or in another scenario's feed: the world adds "
        "realtime_boost to the click logit; controls: 3 h before, or another cuisine: the world adds 0) and compare "
        "the change of the run's ctr logit with the world's. Prints the table and writes RUN/diagnose.json.")
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train`")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="the prepared synthetic data the run was trained on (mtfm prepare --source synthetic)")
    p.add_argument("--scenarios", default=None, help="comma-separated scenarios to probe (default: all of the run's)")
    p.add_argument("--exposures", type=int, default=100, help="test exposures probed per scenario (default 100)")
    p.add_argument("--seed", type=int, default=0, help="which test exposures and inserted items are drawn")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtfm.train.probes import format_probes, results_json, run_probes

    if args.exposures < 2:
        raise ValueError(f"--exposures must be at least 2 (a spread needs two), got {args.exposures}")
    scenarios = [s for s in args.scenarios.split(",") if s] if args.scenarios else None
    results = run_probes(args.run, args.data, scenarios, args.exposures, args.seed, args.checkpoint)
    print(format_probes(results))
    out = Path(args.run) / "diagnose.json"
    out.write_text(json.dumps(results_json(results), indent=2))
    print(f"\nwrote {out}")
    return 0
