"""Signal-recovery probes over several runs of one synthetic world, side by side
(the probes themselves: :mod:`mtfm.train.probes`, also ``mtfm diagnose``).

    python benchmarks/signal_probes.py --data runs/exp/synthetic/data \\
        --run baseline=runs/exp/a --run time-bias=runs/exp/b --exposures 100 --json probes.json
"""

from __future__ import annotations

import argparse
import json

from mtfm.train.probes import format_probes, results_json, run_probes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the prepared synthetic data the runs were trained on")
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a trained run (repeatable)")
    p.add_argument("--scenarios", default=None, help="comma-separated (default: every scenario of each run)")
    p.add_argument("--exposures", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args()
    scenarios = args.scenarios.split(",") if args.scenarios else None
    out = {}
    for spec in args.run:
        name, _, run_dir = spec.partition("=")
        if not run_dir:
            raise SystemExit(f"--run {spec!r}: expected NAME=DIR")
        results = run_probes(run_dir, args.data, scenarios, args.exposures, args.seed)
        print(f"\n### {name} ({run_dir})\n\n{format_probes(results)}")
        out[name] = results_json(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
