"""Can MTFM's target attention learn a content match? A world built to ask only that (issue 10).

One scenario; every exposure shows an item of one of 12 cuisines; users click around in short
sessions. The true click logit is ``-2.5 + boost * [the user clicked the exposure's cuisine in
the last 30 minutes]``: nothing else matters. Tokens carry the cuisine (and an item id). Three
scores are reported on the test split:

* the oracle AUC (true probabilities);
* the AUC of the *proxy* "number of clicks in the last 30 minutes, any cuisine" (what a model
  that learned recency but not the content match reaches);
* the trained MTFM's AUC, and a probe: the logit change when one click 10 minutes before is
  inserted, of the exposure's cuisine (true change +boost) or another (0).

    python benchmarks/match_world.py --out runs/match --model small --epochs 5

The default synthetic world plants the same effect (``realtime_boost``) among many others;
this world isolates it, so one configuration is judged in about two minutes on one core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from mtfm.config import load_schema
from mtfm.data.aggregate import build_request, prepare
from mtfm.data.sources.directory import load_source
from mtfm.data.store import read_manifest
from mtfm.metrics import auc
from mtfm.model.config import load_model_config
from mtfm.train.config import load_train_config
from mtfm.train.evaluate import evaluate_run, scenario_checkpoints
from mtfm.train.models import model_from_checkpoint
from mtfm.train.trainer import train_from_data

CUISINES, DAY, START, DAYS, WINDOW = 12, 86_400, 1_704_067_200, 6, 1_800


def make_world(users: int, boost: float, seed: int, out: Path) -> None:
    """``exposures.parquet``, ``clicks.parquet`` and ``schema.yaml`` in ``out``."""
    rng = np.random.default_rng(seed)
    exposures, clicks = [], []
    for user in range(users):
        for day in range(DAYS):
            if rng.random() < 0.4:
                continue
            start = START + day * DAY + int(rng.integers(8 * 3600, 20 * 3600))
            n = int(rng.integers(1, 6))
            click_ts, click_c = np.sort(start + rng.integers(0, 7200, n)), rng.integers(0, CUISINES, n)
            clicks += [(user, int(t), int(c), int(rng.integers(0, 1000))) for t, c in zip(click_ts, click_c)]
            m = int(rng.integers(5, 20))
            for t, c in zip(np.sort(start + rng.integers(0, 7200, m)), rng.integers(0, CUISINES, m)):
                recent = bool(((click_ts < t) & (click_ts >= t - WINDOW) & (click_c == c)).any())
                p = 1.0 / (1.0 + np.exp(2.5 - boost * recent))
                exposures.append((user, int(t), int(c), int(rng.integers(0, 1000)), int(rng.random() < p), p))
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(exposures, schema=["user_id", "ts", "cuisine", "item_id", "click", "p_click"],
                 orient="row").write_parquet(out / "exposures.parquet")
    pl.DataFrame(clicks, schema=["user_id", "ts", "cuisine", "item_id"], orient="row").write_parquet(out / "clicks.parquet")
    features = [{"kind": "categorical", "name": "cuisine", "num_embeddings": CUISINES, "share": "cuisine"},
                {"kind": "categorical", "name": "item_id", "num_embeddings": 1000, "share": "item_id"}]
    schema = {"user_column": "user_id", "time": {"column": "ts", "unit": "s"}, "window": DAY,
              "split": {"valid_start": START + (DAYS - 2) * DAY, "test_start": START + (DAYS - 1) * DAY},
              "scenarios": [{"name": "S", "table": "exposures", "item_features": features,
                             "tasks": [{"name": "ctr", "labels": ["click"], "oracle_column": "p_click"}]}],
              "realtime": [{"name": "recent", "table": "clicks", "features": features, "max_len": 16}]}
    (out / "schema.yaml").write_text(yaml.safe_dump(schema))


def proxy_auc(raw: Path, test_start: int) -> float:
    """AUC of "clicks in the last 30 minutes, any cuisine" on the test split."""
    test = pl.read_parquet(raw / "exposures.parquet").filter(pl.col("ts") >= test_start).with_row_index("row")
    clicks = pl.read_parquet(raw / "clicks.parquet")
    recent = (test.join(clicks, on="user_id", suffix="_click")
              .filter((pl.col("ts_click") < pl.col("ts")) & (pl.col("ts_click") >= pl.col("ts") - WINDOW))
              .group_by("row").agg(pl.len().alias("recent")))
    scored = test.join(recent, on="row", how="left").fill_null(0)
    return auc(scored["click"].to_numpy(), scored["recent"].to_numpy().astype(float))


def probe(run: Path, raw: Path, data: Path, exposures: int, seed: int) -> dict[str, float]:
    """Mean logit change of one inserted click 10 minutes before: same cuisine, other cuisine."""
    manifest = read_manifest(data)
    model, _, _ = model_from_checkpoint(scenario_checkpoints(run)["S"])
    model.eval()
    test = pl.read_parquet(raw / "exposures.parquet").filter(pl.col("ts") >= manifest.split_boundaries.test_start)
    clicks = pl.read_parquet(raw / "clicks.parquet")
    rng = np.random.default_rng(seed)
    changes: dict[str, list[float]] = {"same cuisine": [], "other cuisine": []}
    for i in rng.permutation(len(test)):
        if len(changes["same cuisine"]) >= exposures:
            break
        row = test[int(i)]
        user, ts, cuisine = int(row["user_id"][0]), int(row["ts"][0]), int(row["cuisine"][0])
        mine = clicks.filter((pl.col("user_id") == user) & (pl.col("ts") < ts))
        if len(mine.filter((pl.col("ts") >= ts - WINDOW) & (pl.col("cuisine") == cuisine))):
            continue  # already boosted

        def logit(table: pl.DataFrame) -> float:
            with torch.no_grad():
                return float(model(build_request({"clicks": table}, manifest, user, "S", row, ts)).logits["S"][0, 0])

        base = logit(mine)
        for name, c in (("same cuisine", cuisine), ("other cuisine", (cuisine + 1 + int(rng.integers(0, 11))) % 12)):
            click = pl.DataFrame({"user_id": [user], "ts": [ts - 600], "cuisine": [c], "item_id": [int(rng.integers(0, 1000))]})
            click = click.select([pl.col(k).cast(mine.schema[k]) for k in mine.columns])
            changes[name].append(logit(pl.concat([mine, click])) - base)
    return {k: float(np.mean(v)) for k, v in changes.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the world, the prepared data and the run")
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--boost", type=float, default=2.0, help="true logit effect of a recent same-cuisine click")
    p.add_argument("--model", default="small", help="model config or preset")
    p.add_argument("--train", default="mtfm", help="training config or preset")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=100)
    args = p.parse_args()
    out = Path(args.out)
    raw, data, run = out / "raw", out / "data", out / "run"
    if not (data / "manifest.json").is_file():
        make_world(args.users, args.boost, 0, raw)
        prepare(load_source(str(raw), load_schema(raw / "schema.yaml"), None, 0), data)
    if run.exists():
        raise SystemExit(f"{run} exists: use another --out, or remove it")
    cfg = load_train_config(args.train).model_copy(update={"epochs": args.epochs, "seed": args.seed, "progress": False})
    train_from_data(data, run, arch="mtfm", model_config=load_model_config(args.model).model_dump(mode="json"), cfg=cfg)
    metrics, _ = evaluate_run(run, data, "test")
    m = metrics["S"]["ctr"]
    changes = probe(run, raw, data, args.probes, args.seed)
    print(f"| model | train | oracle AUC | proxy AUC (recent clicks, any cuisine) | MTFM AUC | "
          f"probe: same cuisine (true +{args.boost}) | probe: other cuisine (true 0) |\n|---|---|---|---|---|---|---|\n"
          f"| {args.model} | {args.train} | {m['oracle_auc']:.4f} | "
          f"{proxy_auc(raw, read_manifest(data).split_boundaries.test_start):.4f} | {m['auc']:.4f} | "
          f"{changes['same cuisine']:+.3f} | {changes['other cuisine']:+.3f} |")


if __name__ == "__main__":
    main()
