"""``mtfm compare``: every model on the same data, budget and tuning effort; the Table-2-style report."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train MTFM and the baselines (LR, DCNv2, MMoE, RankMixer, MTGR, OneTrans, STAR, PEPNet, LightGBM) on the
same prepared data with the same budget (epochs, early stopping on the valid split, batch size) and the
same tuning effort: each model's preset lr times every --lr-factors value, trained with the first seed,
the best valid mean GAUC chosen, then every seed at that lr; no model gets more. Evaluates on the test
split and writes OUT/table.md (AUC and GAUC per scenario x task, mean +- std over seeds, best in bold,
second underlined, cells with fewer than --min-positives test positives marked), OUT/compare.json and
one run directory per (model, lr, seed) under OUT/runs (an interrupted comparison continues where it
stopped)."""


def _models(text: str) -> list[str]:
    from mtfm.compare.runner import MODELS

    return list(MODELS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from mtfm.compare.runner import MODELS

    p = subparsers.add_parser("compare", help="MTFM against seven baselines, LR and LightGBM: one table",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", required=True, help="prepared data directory (has manifest.json)")
    p.add_argument("--out", metavar="OUT", required=True, help="output directory (locked while the comparison runs)")
    p.add_argument("--models", metavar="M1,M2", default="all", type=_models,
                   help=f"models to run, comma separated, or all (default): {', '.join(MODELS)}")
    p.add_argument("--seeds", metavar="S", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every neural model (default 3)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (default 1)")
    p.add_argument("--lr-factors", metavar="F", type=float, nargs="+", default=None,
                   help="lr sweep: factors of each model's preset lr (default 0.333 1 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: the trainer's)")
    p.add_argument("--min-positives", type=int, default=None,
                   help="test positives below which a cell is marked too small to rank models (default 200)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one seed, preset lr (no sweep), one epoch of at most 150 steps per model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from mtfm.compare.runner import CompareConfig, quick_config

    base = quick_config(args.models, args.threads) if args.quick else CompareConfig(models=args.models,
                                                                                    threads=args.threads)
    overrides = {k: v for k, v in dict(seeds=args.seeds, epochs=args.epochs, patience=args.patience,
                                       lr_factors=args.lr_factors, min_positives=args.min_positives).items()
                 if v is not None}
    cfg = base.model_copy(update=overrides)
    cfg = type(cfg).model_validate(cfg.model_dump())  # re-validate the overrides
    cfg.check_models()
    return cfg


def run(args: argparse.Namespace) -> int:
    from mtfm.compare.runner import run_comparison
    from mtfm.compare.table import report_text
    from mtfm.dirlock import hold_dir_lock

    cfg = config_from_args(args)
    with hold_dir_lock(args.out):
        results = run_comparison(args.data, args.out, cfg, progress=not args.quiet)
    print(report_text(results, cfg.min_positives, args.data))
    print(f"wrote {args.out}/table.md and {args.out}/compare.json")
    return 0
