"""torch.profiler table of the real training step (``Trainer.train_step``) on one thread.

Run once per source tree to compare two versions (``PYTHONPATH=<checkout>/src``); the tables
in ``benchmarks/results/issue13_profile.md`` come from this script. Batches are loaded first
and kept in memory, so the table shows the step (forward, loss, backward, clipping, optimizer),
not the loader.

    mtfm prepare --source synthetic --users 2000 --seed 0 --out /tmp/p_syn
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --data /tmp/p_syn --steps 8
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mtfm
from mtfm.data.loader import BatchLoader
from mtfm.model.config import load_model_config
from mtfm.train.config import TrainConfig
from mtfm.train.distributed import DistContext
from mtfm.train.models import build_model
from mtfm.train.trainer import Trainer, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25, help="ops in the table")
    ap.add_argument("--sparse-embeddings", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loader = BatchLoader(args.data, "train", args.batch_size, shuffle=True, seed=0)
    batches = [copy.deepcopy(b) for _, b in zip(range(args.warmup + args.steps), loader.iterate(0))]
    seed_everything(0, True)
    model = build_model("mtfm", load_model_config(args.model).model_dump(mode="json"), loader.schema)
    extra = {"sparse_embedding_updates": True, "embedding_optimizer": "adam"} if args.sparse_embeddings else {}
    cfg = TrainConfig(batch_size=args.batch_size, progress=False, **extra)
    with tempfile.TemporaryDirectory(prefix="mtfm-profile-") as tmp:
        trainer = Trainer(model, loader, loader, loader.schema, cfg, Path(tmp), {"arch": "mtfm"}, DistContext())
        for b in batches[: args.warmup]:
            trainer.train_step(b)
        timed = batches[args.warmup :]
        t0 = time.perf_counter()
        for b in timed:
            trainer.train_step(b)
        plain = (time.perf_counter() - t0) / len(timed)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in timed:
                trainer.train_step(b)
    print(f"source: {mtfm.__file__}")
    print(f"model {args.model}, batch {args.batch_size}, {len(timed)} steps: {1000 * plain:.1f} ms per step unprofiled")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
