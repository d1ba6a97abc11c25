"""Predictions -> AUC / GAUC / logloss per scenario x task, beside the oracle ceiling.

The model scores every exposure of every batch; predictions are collected per scenario
(user id, labels, label mask, probabilities, oracle probabilities), gathered across ranks
under torchrun, and only then turned into metrics with :func:`mtfm.metrics.task_metrics`
(AUC from scikit-learn, GAUC per user weighted by exposures, single-class users skipped and
counted). Only exposures whose label is observed (``label_mask``) count for a task.

When the data knows the true probabilities (synthetic worlds), the same metrics computed on
the oracle probabilities of the same exposures give the ceiling any model can reach:
``oracle_auc`` / ``oracle_gauc`` (and ``oracle_logloss``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mtfm.data.batch import JaggedBatch
from mtfm.metrics import task_metrics
from mtfm.train.distributed import DistContext, gather_arrays

if TYPE_CHECKING:
    from mtfm.data.loader import BatchLoader

Metrics = dict[str, dict[str, dict[str, float]]]  # scenario -> task -> name -> value


@dataclass
class ScenarioPredictions:
    """Every scored exposure of one scenario (rows in batch order)."""

    users: np.ndarray  # int64 [n]
    labels: np.ndarray  # float32 [n, tasks]
    mask: np.ndarray  # bool [n, tasks]
    probs: np.ndarray  # float32 [n, tasks]
    oracle: np.ndarray  # float32 [n, tasks], NaN when unknown

    @staticmethod
    def concat(parts: list["ScenarioPredictions"], num_tasks: int) -> "ScenarioPredictions":
        if not parts:
            empty2 = np.zeros((0, num_tasks), dtype=np.float32)
            return ScenarioPredictions(np.zeros(0, np.int64), empty2, empty2.astype(bool), empty2, empty2)
        return ScenarioPredictions(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("users", "labels", "mask", "probs", "oracle"))
        )


def row_user_ids(batch: JaggedBatch, offsets: torch.Tensor) -> torch.Tensor:
    """The user id of every row of a jagged field (rows -> user via offsets)."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(batch.user_ids.to(offsets.device), counts)


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[JaggedBatch],
    device: torch.device,
    task_names: Mapping[str, list[str]],
    *,
    bf16: bool = False,
) -> dict[str, ScenarioPredictions]:
    """Score every exposure of ``batches`` with ``model`` (eval mode; restored afterwards)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[ScenarioPredictions]] = {s: [] for s in task_names}
    try:
        for batch in batches:
            batch = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(batch)
            for name, sb in batch.scenarios.items():
                if name not in parts:
                    raise KeyError(f"batch has scenario {name!r}, the model knows {sorted(parts)}")
                if sb.num_rows == 0:
                    continue
                logits = out.logits[name].float()
                parts[name].append(
                    ScenarioPredictions(
                        users=row_user_ids(batch, sb.offsets).cpu().numpy().astype(np.int64),
                        labels=sb.labels.float().cpu().numpy(),
                        mask=sb.label_mask.bool().cpu().numpy(),
                        probs=torch.sigmoid(logits).cpu().numpy(),
                        oracle=sb.oracle.float().cpu().numpy(),
                    )
                )
    finally:
        model.train(was_training)
    return {s: ScenarioPredictions.concat(p, len(task_names[s])) for s, p in parts.items()}


def gather_predictions(ctx: DistContext, preds: dict[str, ScenarioPredictions]) -> dict[str, ScenarioPredictions]:
    """Every rank's predictions on every rank (rank order), before any metric is computed."""
    if not ctx.initialized:
        return preds
    out = {}
    for name in sorted(preds):
        p = preds[name]
        g = gather_arrays(ctx, {f: getattr(p, f) for f in ("users", "labels", "mask", "probs", "oracle")})
        out[name] = ScenarioPredictions(**g)
    return {name: out[name] for name in preds}


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def compute_metrics(preds: Mapping[str, ScenarioPredictions], task_names: Mapping[str, list[str]]) -> Metrics:
    """``{scenario: {task: {auc, gauc, logloss, exposures, positives, users_*, oracle_*}}}``.

    NaN (a task with one class only) becomes ``None`` so the result is valid JSON.
    """
    result: Metrics = {}
    for scenario, tasks in task_names.items():
        p = preds[scenario]
        result[scenario] = {}
        for t, task in enumerate(tasks):
            rows = p.mask[:, t]
            users, labels, probs = p.users[rows], p.labels[rows, t], p.probs[rows, t]
            entry = {k: _finite(v) for k, v in task_metrics(users, labels, probs).as_dict().items()}
            oracle = p.oracle[rows, t]
            known = ~np.isnan(oracle)
            if known.any():
                om = task_metrics(users[known], labels[known], oracle[known])
                entry.update(oracle_auc=_finite(om.auc), oracle_gauc=_finite(om.gauc), oracle_logloss=_finite(om.logloss))
                if not known.all():
                    entry["oracle_exposures"] = int(known.sum())
            result[scenario][task] = entry
    return result


def mean_gauc(metrics: Metrics) -> float | None:
    """The early-stopping score: the mean of every (scenario, task) GAUC, weighted by the users
    it averages over (``users_scored``).

    An unweighted mean would let a task with a handful of positives (a few users with both
    classes, a GAUC that is mostly noise) weigh as much as a task scored on thousands of users.
    """
    pairs = [(m["gauc"], m["users_scored"]) for tasks in metrics.values() for m in tasks.values()
             if m.get("gauc") is not None and m["users_scored"] > 0]
    if not pairs:
        return None
    values, weights = np.array(pairs, dtype=np.float64).T
    return float(np.sum(values * weights) / np.sum(weights))


def gap_closed(model: float | None, baseline: float | None, oracle: float | None) -> float | None:
    """Fraction of the baseline -> oracle gap the model closes (1 = reaches the oracle).

    None when undefined: a value is missing, or the baseline already scores at or above the
    oracle on these exposures (possible by chance when a task has a handful of positives).
    """
    if model is None or baseline is None or oracle is None or oracle <= baseline:
        return None
    return (model - baseline) / (oracle - baseline)


MIN_POSITIVES_FOR_GAP = 50
"""Below this many positives the gap-closed column says so instead of a percentage: with a
handful of positives AUC moves by several points between seeds and (model - LR) / (oracle -
LR) can land anywhere (200 % was seen on a task with 4 positives)."""


def _gap_cell(model: float | None, baseline: float | None, oracle: float | None, positives: int, least: int) -> str:
    if positives < least:
        return f"n/a (<{least} pos.)"
    closed = gap_closed(model, baseline, oracle)
    return "-" if closed is None else f"{100 * closed:.0f}%"


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(metrics: Metrics, baseline: Metrics | None = None, baseline_name: str = "LR",
                 min_positives_for_gap: int = MIN_POSITIVES_FOR_GAP) -> str:
    """Markdown table, one row per scenario x task; oracle and baseline columns when known.

    With both a baseline and the oracle, the share of the baseline -> oracle gap the model
    closes, for AUC and GAUC (only where the task has ``min_positives_for_gap`` positives).
    """
    has_oracle = any("oracle_auc" in m for tasks in metrics.values() for m in tasks.values())
    head = ["scenario", "task", "exposures", "positives", "AUC", "GAUC", "logloss"]
    if baseline is not None:
        head += [f"{baseline_name} AUC", f"{baseline_name} GAUC"]
    if has_oracle:
        head += ["oracle AUC", "oracle GAUC"]
    if baseline is not None and has_oracle:
        head += ["AUC gap closed", "GAUC gap closed"]
    head += ["users skipped (1 class)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for scenario, tasks in metrics.items():
        for task, m in tasks.items():
            row = [scenario, task, str(m["exposures"]), str(m["positives"]), _fmt(m["auc"]), _fmt(m["gauc"]), _fmt(m["logloss"])]
            b = baseline.get(scenario, {}).get(task) if baseline is not None else None
            if baseline is not None:
                row += [_fmt(b and b["auc"]), _fmt(b and b["gauc"])]
            if has_oracle:
                row += [_fmt(m.get("oracle_auc")), _fmt(m.get("oracle_gauc"))]
            if baseline is not None and has_oracle:
                row += [_gap_cell(m[k], b and b[k], m.get(f"oracle_{k}"), m["positives"], min_positives_for_gap)
                        for k in ("auc", "gauc")]
            row.append(f"{m['users_skipped_single_class']} of {m['users_scored'] + m['users_skipped_single_class']}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A finished run on a split of a prepared directory (what `mtfm evaluate` runs)
# --------------------------------------------------------------------------------------------


CHECKPOINT_CHOICES = ("best", "best-overall", "last")


def scenario_checkpoints(run_dir: str | Path, which: str = "best") -> dict[str, Path]:
    """Which checkpoint scores each scenario of a run.

    ``best``: each scenario's own best epoch by the run's selection (``best-<scenario>``; default
    valid GAUC, see :mod:`mtfm.train.selection`; the deployment view, one subgraph per
    scenario); ``best-overall``: the epoch with the best overall selection score; ``last``: the latest training checkpoint. A run that never finished an
    epoch has only ``last``, which every choice then falls back to.
    """
    from mtfm.train.checkpoint import CheckpointManager, read_checkpoint_config

    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be one of {list(CHECKPOINT_CHOICES)}, got {which!r}")
    mgr = CheckpointManager(run_dir)
    latest = mgr.latest()
    if latest is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint (train with `mtfm train --out {run_dir}`)")
    scenarios = [s["name"] for s in read_checkpoint_config(latest)["schema"]["scenarios"]]
    overall = (mgr.best() if which != "last" else None) or latest
    if which != "best":
        return {s: overall for s in scenarios}
    return {s: mgr.snapshot(f"best-{s}") or overall for s in scenarios}


def checkpoint_loader(ckpt: Path, data_dir: str | Path, split: str, names: list[str], batch_size: int) -> BatchLoader:
    """A loader over ``split`` of ``data_dir`` that reads what checkpoint ``ckpt`` was trained on:
    scenarios ``names`` and the run's inputs (``drop_inputs`` of an ablation run). The data's
    schema for them must be the model's (else the ids would mean other things)."""
    from mtfm.config import schema_from_dict
    from mtfm.data.loader import BatchLoader
    from mtfm.train.checkpoint import read_checkpoint_config

    config = read_checkpoint_config(ckpt)
    schema = schema_from_dict(config["schema"], f"{ckpt}/config.json: schema")
    drop = config.get("drop_inputs", [])  # absent in runs from before input ablations
    loader = BatchLoader(data_dir, split, batch_size, shuffle=False, seed=0, scenarios=names, drop_inputs=drop)
    if loader.schema.model_dump() != schema.restrict(names).model_dump():
        raise ValueError(
            f"{data_dir}: its schema for {names} differs from the one {ckpt} was trained on "
            "(prepare the data with the same schema)"
        )
    return loader


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str = "test",
    *,
    checkpoint: str = "best",
    batch_size: int = 256,
    device: str = "cpu",
    allow_other_data: bool = False,
    precision: str = "fp32",
) -> tuple[Metrics, dict[str, Path]]:
    """Metrics of a trained run on ``split`` of ``data_dir``; also which checkpoint scored each scenario.

    Only the scenarios the model was trained on are read; the data's schema for them must be
    the one the model was built from (else the ids would mean other things), and the data
    itself the run's (its fingerprint, :mod:`mtfm.train.rundata`) unless ``allow_other_data``.
    ``precision`` ``bf16`` scores under bf16 autocast (the inference option; fp32 is the reference).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    from mtfm.train.distributed import choose_device
    from mtfm.train.models import model_from_checkpoint
    from mtfm.train.rundata import check_checkpoint_data

    chosen = scenario_checkpoints(run_dir, checkpoint)
    groups: dict[Path, list[str]] = {}
    for scenario, ckpt in chosen.items():
        groups.setdefault(ckpt, []).append(scenario)
    for ckpt in groups:
        check_checkpoint_data(ckpt, data_dir, action="evaluate", allow_other_data=allow_other_data)
    dev = choose_device(device, 0)
    metrics: Metrics = {}
    for ckpt, names in groups.items():
        model, _, _ = model_from_checkpoint(ckpt)
        loader = checkpoint_loader(ckpt, data_dir, split, names, batch_size)
        tasks = {s.name: s.task_names for s in loader.schema.scenarios}
        preds = predict(model.to(dev), loader.iterate(0), dev, tasks, bf16=precision == "bf16")
        metrics.update(compute_metrics(preds, tasks))
    return {s: metrics[s] for s in chosen}, chosen
