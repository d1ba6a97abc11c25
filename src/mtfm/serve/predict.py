"""Batch prediction: every exposure of a prepared split scored by a trained run, written as Parquet.

One row per exposure with the keys a user joins it back on -- ``user_id``, ``scenario``,
``ts``, ``source_table`` and ``source_row`` (the exposure's 0-based row in that scenario's
source table, as ``mtfm prepare`` read it) -- then ``score.<task>`` (the predicted probability;
null for tasks the scenario does not have), ``label.<task>`` (1 / 0, null when not observed
or not a task of the scenario) and ``checkpoint``, the checkpoint that scored the row (each
scenario from its own best epoch by default, as ``mtfm evaluate`` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mtfm.data.loader import BatchLoader
from mtfm.data.store import read_manifest
from mtfm.train.evaluate import checkpoint_loader, scenario_checkpoints
from mtfm.train.models import model_from_checkpoint
from mtfm.train.rundata import check_checkpoint_data


@torch.no_grad()
def _score_split(model: torch.nn.Module, loader: BatchLoader, ckpt: Path, tables: dict[str, str],
                 tasks: list[str]) -> list[pl.DataFrame]:
    model.eval()
    frames = []
    for batch in loader.iterate(0):
        out = model(batch)
        for name, sb in batch.scenarios.items():
            if sb.num_rows == 0:
                continue
            if sb.source_row is None:
                raise ValueError(f"{loader.data_dir}: the store has no source rows (prepare it again with this version)")
            users = torch.repeat_interleave(batch.user_ids, sb.offsets[1:] - sb.offsets[:-1])
            probs = torch.sigmoid(out.logits[name].float()).numpy()
            labels = torch.where(sb.label_mask, sb.labels, torch.full_like(sb.labels, float("nan"))).numpy()
            own = loader.schema.scenario(name).task_names
            cols: dict[str, object] = {
                "user_id": users.numpy(), "scenario": [name] * sb.num_rows, "ts": sb.timestamps.numpy(),
                "source_table": [tables[name]] * sb.num_rows, "source_row": sb.source_row.numpy(),
            }
            for task in tasks:
                k = own.index(task) if task in own else None
                cols[f"score.{task}"] = probs[:, k] if k is not None else np.full(sb.num_rows, np.nan, np.float32)
                cols[f"label.{task}"] = labels[:, k] if k is not None else np.full(sb.num_rows, np.nan, np.float32)
            cols["checkpoint"] = [str(ckpt)] * sb.num_rows
            frames.append(pl.DataFrame(cols))
    return frames


def predict_split(run_dir: str | Path, data_dir: str | Path, split: str, out: str | Path, *,
                  checkpoint: str = "best", batch_size: int = 256, overwrite: bool = False,
                  allow_other_data: bool = False) -> pl.DataFrame:
    """Score every exposure of ``split`` and write ``out`` (Parquet, written to a temporary file
    then renamed, so a reader never sees half a file). Returns the written frame. Data other
    than the run's (by fingerprint, :mod:`mtfm.train.rundata`) is refused unless ``allow_other_data``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    chosen = scenario_checkpoints(run_dir, checkpoint)
    groups: dict[Path, list[str]] = {}
    for scenario, ckpt in chosen.items():
        groups.setdefault(ckpt, []).append(scenario)
    for ckpt in groups:
        check_checkpoint_data(ckpt, data_dir, action="predict", allow_other_data=allow_other_data)
    frames: list[pl.DataFrame] = []
    data_schema = read_manifest(data_dir).schema_obj.restrict(list(chosen))
    all_tasks = list(dict.fromkeys(t for s in data_schema.scenarios for t in s.task_names))
    for ckpt, names in groups.items():
        model, _, _ = model_from_checkpoint(ckpt)
        loader = checkpoint_loader(ckpt, data_dir, split, names, batch_size)
        tables = {s.name: s.table for s in loader.schema.scenarios}
        frames += _score_split(model, loader, ckpt, tables, all_tasks)
    if not frames:
        raise ValueError(f"{data_dir}: split {split!r} has no exposure of {sorted(chosen)}")
    frame = pl.concat(frames, how="vertical").with_columns(pl.col("^(score|label)\\..*$").fill_nan(None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, out)
    return frame
