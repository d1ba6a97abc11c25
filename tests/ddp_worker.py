"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Trains the tiny model on batches dealt unequally to the ranks (8 and 7 train batches, 3 and 2
valid batches), then writes what the test checks: whether every rank ends with the same
weights, the padding steps, and the gathered valid metrics next to the metrics of the same
model scored in one process on all valid batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from train_fixtures import MemoryBatches, TinyRanker, make_split, tiny_schema

from mtfm.train.config import TrainConfig
from mtfm.train.distributed import setup, teardown
from mtfm.train.evaluate import compute_metrics, predict
from mtfm.train.trainer import fit


def main(out: Path) -> None:
    ctx = setup("cpu")
    schema = tiny_schema()
    train_all, valid_all = make_split(schema, 15, seed=1), make_split(schema, 5, seed=2)
    torch.manual_seed(0)
    model = TinyRanker(schema)
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, log_every=2, checkpoint_every=3)
    result = fit(
        model,
        MemoryBatches(train_all, shuffle=True, seed=0, rank=ctx.rank, world_size=ctx.world_size),
        MemoryBatches(valid_all, shuffle=False, seed=0, rank=ctx.rank, world_size=ctx.world_size),
        schema, cfg, out / "run", ctx=ctx,
        run_config={"arch": "tiny", "model": {}, "schema": schema.model_dump(mode="json")},
    )
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(ctx.world_size)]
    dist.all_gather(parts, flat)
    if ctx.is_main:
        tasks = {s.name: s.task_names for s in schema.scenarios}
        single = compute_metrics(predict(model, valid_all, torch.device("cpu"), tasks), tasks)
        report = {
            "world_size": ctx.world_size,
            "same_weights_on_all_ranks": all(torch.equal(parts[0], p) for p in parts[1:]),
            "metrics": result.metrics,
            "single_process_valid": single,
            "valid_exposures": {s: sum(b.scenarios[s].num_rows for b in valid_all) for s in tasks},
        }
        (out / "report.json").write_text(json.dumps(report))
    teardown(ctx)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
