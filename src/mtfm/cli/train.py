"""``mtfm train``: train MTFM (or a baseline) on a prepared directory; thin, see mtfm.train."""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path

from mtfm.dirlock import hold_dir_lock
from mtfm.train.config import TrainConfig, load_train_config, train_config_from_dict
from mtfm.train.extend import FREEZE_MODES, WarmStart
from mtfm.train.models import ARCHS
from mtfm.train.selection import Selection, SelectionError

SELECT_HELP = """\
model selection (--select, or `select:` in the training config):
  gauc | auc | logloss        global metric: selects RUN's `best` snapshot (over every scenario's
                              tasks) and each scenario's `best-S`; default gauc
  S=METRIC  S@T1+T2  S=METRIC@T1+T2
                              scenario S's `best-S` is METRIC (default: the global one) over tasks
                              T1, T2 (default all); a task list also restricts S's tasks in `best`
  e.g. --select auc,SQS=gauc@ctr+ctcvr  (= --select auc --select SQS=gauc@ctr+ctcvr)
  Means are weighted so a scenario with a handful of users cannot decide: GAUC by users scored,
  AUC by positives, logloss by exposures (lower is better: the score is -logloss). Unknown
  scenarios or tasks are refused at the start; --resume with another selection is refused. The
  selection and each epoch's score are in train_log.csv, metrics.json and checkpoints/best*.json."""

DESCRIPTION = """\
Train one model on DIR's train split (prepared by `mtfm prepare`), selecting the best snapshots
and early-stopping on the valid split (--select; default GAUC weighted by users scored), and write
RUN/checkpoints/ (safetensors + JSON, atomic), RUN/train_log.csv and RUN/metrics.json. Runs unchanged under `torchrun --nproc_per_node N -m mtfm train ...`
(DDP; gloo on CPU, nccl on GPU; DIR needs >= N shards per split: `mtfm prepare --shards N`).
An interrupted run continues exactly where its last checkpoint left it with --resume."""


def _comma_list(text: str | None) -> list[str] | None:
    """``"A, B"`` -> ``["A", "B"]``; None or empty -> None."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from mtfm.cli.presets import presets_epilog

    p = subparsers.add_parser("train", help="train MTFM (or a baseline) on prepared data",
                              description=DESCRIPTION, epilog=SELECT_HELP + "\n\n" + presets_epilog(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", required=True, help="prepared data directory (has manifest.json)")
    p.add_argument("--out", metavar="RUN", required=True, help="run directory for checkpoints, logs, metrics.json")
    p.add_argument("--arch", choices=ARCHS, default="mtfm", help="model to train (default mtfm; logistic = LR baseline; the others: the baselines of issue 14, mtfm.baselines)")
    p.add_argument("--model", metavar="YAML", default=None,
                   help="model config: for MTFM a YAML file or a preset name (listed below), default small; for a baseline a "
                        "YAML of its config class's fields (mtfm.baselines.<arch>), default its paper's settings")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", metavar="E", type=int, default=None, help="epochs (default: the config's)")
    budget.add_argument("--max-steps", metavar="N", type=int, default=None,
                        help="stop after N optimizer steps (mid-epoch allowed; epochs unbounded)")
    p.add_argument("--scenarios", metavar="S1,S2", default=None,
                   help="train on these scenarios only (e.g. SQS for a single-scenario model); default all")
    p.add_argument("--drop-inputs", metavar="KINDS", default=None,
                   help="input ablation: leave out some of history,realtime,cross (comma separated); the run "
                        "records it and evaluate/predict read the data the same way")
    p.add_argument("--seed", metavar="S", type=int, default=None, help="seed of init, shuffling and dropout (default 0)")
    p.add_argument("--config", metavar="YAML", default=None,
                   help="training config: a YAML of mtfm.train.config.TrainConfig fields or a preset name (mtfm, "
                        "logistic; their settings are listed below); default: the arch's preset; the options below "
                        "override it")
    p.add_argument("--batch-size", type=int, default=None, help="samples (users) per batch per rank (default 64)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the dense optimizer (default: the preset's)")
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="learning rate of the embedding tables' own Adam (default: the preset's)")
    p.add_argument("--sparse-embeddings", action="store_true",
                   help="update only the embedding rows a batch touches (sparse gradients; the tables get their "
                        "own optimizer: lazy Adam, or Adagrad when the config says adagrad)")
    p.add_argument("--select", metavar="SEL", action="append", default=None,
                   help="what selects the best snapshots and drives early stopping: gauc, auc or logloss, plus "
                        "per-scenario overrides SCENARIO[=METRIC][@TASK+TASK]; comma separated or repeated "
                        "(default: the config's, gauc); see below")
    p.add_argument("--patience", type=int, default=None,
                   help="epochs without a gain of the selection score (overall or any scenario's) before stopping "
                        "(default 2)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else one core less than the machine has, "
                        "so the loader's prefetch thread keeps a core)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN from its latest intact checkpoint (a damaged one is skipped, with a warning, "
                        "for the one before it)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: continue although DIR is not the data RUN was trained on (its manifest "
                        "fingerprint differs); refused without this flag")
    p.add_argument("--init-from", metavar="RUN", default=None,
                   help="warm start (e.g. to add a scenario): copy every parameter of RUN's best snapshot (or of a "
                        "checkpoint directory) whose name and shape this model has; the rest (a new scenario's "
                        "tokenizer, GLN group, heads, own tables) starts fresh. Refused, naming the field or tensor, "
                        "when the model config, a shape or a table's ids differ (mtfm.train.extend)")
    p.add_argument("--freeze", choices=FREEZE_MODES, default=None,
                   help="with --init-from: none (default) fine-tunes everything; backbone freezes RUN's HTA stack "
                        "weights; shared freezes everything copied from RUN (its scenarios then score as in RUN); "
                        "a new scenario's own pieces, its GLN group and heads included, always train")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = load_train_config(args.config or args.arch).model_dump()  # default: the arch's training preset
    overrides = {
        "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed, "batch_size": args.batch_size,
        "lr": args.lr, "embedding_lr": args.embedding_lr, "patience": args.patience,
        "checkpoint_every": args.checkpoint_every, "device": args.device,
        "threads": args.threads,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.select:
        try:
            base["select"] = Selection.parse(args.select).model_dump()
        except SelectionError as err:
            raise SelectionError("--select: " + str(err).removeprefix("select: ")) from None
    if args.sparse_embeddings:
        base["sparse_embedding_updates"] = True
    if (args.embedding_lr is not None or args.sparse_embeddings) and base.get("embedding_optimizer", "shared") == "shared":
        base["embedding_optimizer"] = "adam"  # an embedding lr or sparse updates need the embeddings' own optimizer
    if args.max_steps is not None and args.epochs is None:
        base["epochs"] = 1_000_000  # the step budget decides
    if args.bf16:
        base["bf16"] = True
    if args.quiet:
        base["progress"] = False
    return train_config_from_dict(base, "training config (" + (f"{args.config} + " if args.config else "")
                                  + "command line)")


def warm_start_from_args(args: argparse.Namespace) -> WarmStart | None:
    """``--init-from`` / ``--freeze`` (a freeze without a run to start from is refused)."""
    if args.init_from is None:
        if args.freeze is not None:
            raise ValueError("--freeze needs --init-from RUN (the run whose weights are kept)")
        return None
    return WarmStart(Path(args.init_from), args.freeze or "none")


def model_config_from_args(arch: str, model: str | None) -> dict:
    if arch == "mtfm":
        from mtfm.model.config import load_model_config

        return load_model_config(model or "small").model_dump(mode="json")
    if model is None:
        return {}  # the baseline's config defaults (its paper's recommended settings)
    from mtfm.train.models import baseline_classes
    from mtfm.yamlio import safe_load

    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--model {model}: file not found (a baseline takes a YAML of its config's fields)")
    _, config_cls = baseline_classes(arch)
    return config_cls.model_validate(safe_load(path.read_text()) or {}).model_dump(mode="json")


def run(args: argparse.Namespace) -> int:
    # RUN's lock before any work, so a second train into it fails at once (under torchrun rank 0
    # locks; the trainer takes the same lock again, which a process may).
    with hold_dir_lock(args.out, "mtfm train") if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    from mtfm.train.trainer import train_from_data

    cfg = train_config_from_args(args)
    warm_start = warm_start_from_args(args)
    if args.arch == "mtfm" and int(os.environ.get("RANK", "0")) == 0:  # which features read which table
        from mtfm.sharing import run_sharing_plan

        print(run_sharing_plan(args.data, _comma_list(args.scenarios), _comma_list(args.drop_inputs) or ()), flush=True)
    result = train_from_data(args.data, args.out, arch=args.arch, model_config=model_config_from_args(args.arch, args.model),
                             cfg=cfg, scenarios=_comma_list(args.scenarios), drop_inputs=_comma_list(args.drop_inputs) or (),
                             resume=args.resume, allow_other_data=args.allow_other_data, warm_start=warm_start)
    m = result.metrics
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    best = m["best"]
    summary = {"status": m["status"], "steps": m["steps"], "epochs_completed": m["epochs_completed"],
               "select": m["select"], "best_epoch": best and best["epoch"],
               "best_selection_score": best and best["selection_score"],
               "best_valid_mean_gauc": best and best["valid_mean_gauc"],
               "best_epoch_by_scenario": {s: b["epoch"] for s, b in m["best_by_scenario"].items()},
               "exposures_per_s": m["throughput"]["exposures_per_s"], "tokens_per_s": m["throughput"]["tokens_per_s"]}
    print(json.dumps(summary))
    print(f"wrote {args.out}/metrics.json")
    return 0
