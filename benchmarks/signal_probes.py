"""Does a trained model read what its real-time tokens say? A counterfactual probe on the
synthetic world, whose true effects are known.

The world adds ``realtime_boost`` (+1.2) to the click logit of an exposure while a click on the
same cuisine happened in the last ``realtime_window_s`` (30 min); that signal reaches a model
mainly through the R tokens. For test exposures of one scenario whose user has no
same-cuisine click in the 30 minutes before them (so the boost is off), the probe scores the
exposure as a serving request (:func:`mtfm.data.aggregate.build_request`: the training feature
code; a request equals the training sample's logits, ``tests/test_leakage.py``), then again
with one organic search click inserted into the user's behaviour log:

* ``same cuisine, 10 min before``: the world's effect is +realtime_boost;
* ``same cuisine, 3 h before`` (outside the window) and ``other cuisine, 10 min before``:
  controls, the world's effect is 0.

It reports the mean +- std over exposures of the change of the model's ctr logit per probe
beside the true change. The exposure's own features (its past-CTR cross feature included)
are left as they are.

    python benchmarks/signal_probes.py --run runs/exp/synthetic/seed0/multi --data runs/exp/synthetic/data \\
        --users 6000 --exposures 150
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import polars as pl
import torch

from mtfm.data.aggregate import build_request
from mtfm.data.sources.synthetic import SCENARIO_SEARCH, SyntheticConfig, load_source
from mtfm.data.store import read_manifest
from mtfm.train.evaluate import scenario_checkpoints
from mtfm.train.models import model_from_checkpoint

MINUTE = 60


def _probe_click(user: int, ts: int, cuisine: int, item_id: int, price_bucket: int, schema) -> pl.DataFrame:
    return pl.DataFrame({schema.user_column: [user], schema.time.column: [ts], "scenario": [SCENARIO_SEARCH],
                         "item_id": [item_id], "cuisine": [cuisine], "price_bucket": [price_bucket]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained MTFM run (its best checkpoint for --scenario is used)")
    p.add_argument("--data", required=True, help="the prepared synthetic data the run was trained on")
    p.add_argument("--users", type=int, required=True, help="users of the world (as prepared)")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--scenario", default="HP")
    p.add_argument("--exposures", type=int, default=150)
    p.add_argument("--seed", type=int, default=0, help="which test exposures are drawn")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    manifest = read_manifest(args.data)
    schema = manifest.schema_obj
    raw = load_source(None, schema, args.users, args.world_seed)
    world = SyntheticConfig(users=args.users, seed=args.world_seed)
    model, _, _ = model_from_checkpoint(scenario_checkpoints(args.run)[args.scenario])
    model.eval()
    spec = schema.scenario(args.scenario)
    ucol, tcol = schema.user_column, schema.time.column
    exposures = raw.tables[spec.table].filter(pl.col(tcol) >= manifest.split_boundaries.test_start)
    clicks = raw.tables["clicks"]

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(exposures))
    probes = {
        "same cuisine, 10 min before": (10 * MINUTE, True, world.realtime_boost),
        "same cuisine, 3 h before": (180 * MINUTE, True, 0.0),
        "other cuisine, 10 min before": (10 * MINUTE, False, 0.0),
    }
    changes: dict[str, list[float]] = {name: [] for name in probes}
    for i in order:
        if len(changes["same cuisine, 10 min before"]) >= args.exposures:
            break
        row = exposures[int(i)]
        user, ts, cuisine = int(row[ucol][0]), int(row[tcol][0]), int(row["cuisine"][0])
        mine = clicks.filter((pl.col(ucol) == user) & (pl.col(tcol) < ts))
        recent = mine.filter((pl.col(tcol) >= ts - world.realtime_window_s) & (pl.col("cuisine") == cuisine))
        if len(recent):  # the boost is already on: inserting another click changes nothing in the world
            continue
        known = {"clicks": mine, "orders": raw.tables["orders"].filter((pl.col(ucol) == user) & (pl.col(tcol) < ts))}
        candidate = row  # its labels ride along unused (a request's labels are optional)

        def ctr_logit(tables) -> float:
            batch = build_request(tables, manifest, user, args.scenario, candidate, ts)
            with torch.no_grad():
                return float(model(batch).logits[args.scenario][0, 0])

        base = ctr_logit(known)
        for name, (before, same, _) in probes.items():
            other = (cuisine + 1 + int(rng.integers(0, 11))) % 12
            click = _probe_click(user, ts - before, cuisine if same else other, int(rng.integers(0, 20_000)),
                                 int(rng.integers(0, 4)), schema)
            click = click.select([pl.col(c).cast(known["clicks"].schema[c]) for c in known["clicks"].columns])
            with_click = {**known, "clicks": pl.concat([known["clicks"], click])}
            changes[name].append(ctr_logit(with_click) - base)

    print(f"{args.scenario} ctr logit change over {len(changes['same cuisine, 10 min before'])} test exposures "
          f"without a recent same-cuisine click ({args.run}):\n")
    print("| probe (one organic click inserted) | true change | model change (mean ± std) | share of the true effect |")
    print("|---|---|---|---|")
    out = {}
    for name, (_, _, truth) in probes.items():
        v = np.array(changes[name])
        share = f"{v.mean() / truth:.0%}" if truth else "-"
        print(f"| {name} | {truth:+.2f} | {v.mean():+.4f} ± {v.std(ddof=1):.4f} | {share} |")
        out[name] = {"true": truth, "mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": int(v.size)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
