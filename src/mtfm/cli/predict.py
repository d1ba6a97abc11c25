"""``mtfm predict``: every exposure of a split scored by a trained run, written as Parquet."""

from __future__ import annotations

import argparse

from mtfm.train.evaluate import CHECKPOINT_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="per-exposure scores of a split, with the keys to join them back to the source tables",
        description="Score every exposure of a split of DIR with RUN and write FILE.parquet: one row per exposure "
        "with user_id, scenario, ts, source_table, source_row (the exposure's 0-based row in that table, as "
        "prepare read it), score.<task> (predicted probability; null for tasks the scenario does not have), "
        "label.<task> (null when not observed) and checkpoint (the one that scored the row).")
    p.add_argument("--run", metavar="RUN", required=True, help="run directory written by `mtfm train`")
    p.add_argument("--data", metavar="DIR", required=True, help="prepared data directory")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--out", metavar="FILE.parquet", required=True)
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="best: each scenario from its own best epoch by the run's selection (default; `mtfm train "
                        "--select`); best-overall; last")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--allow-other-data", action="store_true",
                   help="score although DIR is not the data RUN was trained on (its manifest fingerprint differs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtfm.serve.predict import predict_split

    frame = predict_split(args.run, args.data, args.split, args.out, checkpoint=args.checkpoint,
                          batch_size=args.batch_size, overwrite=args.overwrite,
                          allow_other_data=args.allow_other_data)
    per = frame.group_by("scenario", maintain_order=True).len()
    print(f"wrote {args.out}: {len(frame):,} exposures ("
          + ", ".join(f"{s} {n:,}" for s, n in per.iter_rows()) + ")")
    return 0
