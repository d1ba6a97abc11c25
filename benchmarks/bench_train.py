"""Training throughput of MTFM on CPU, and achieved FLOP/s against this CPU's fp32 matmul rate.

Both are measured in the same run, side by side, so the ratio holds on a shared machine:

1. matmul rates of this CPU: ``torch.mm`` of two n x n matrices, fp32 and bf16, on every core
   and on the training's own thread count, repeated; best of several rounds, taken before and
   after the training measurement (the lower of the two bests is the reference, so a quieter
   moment does not flatter the ratio). Utilisation = achieved model FLOP/s over each.
2. Training steps of the real trainer (``Trainer.train_step``: forward, loss, backward, grad
   clipping, Adam) on batches of the prepared data already in memory, so the figure is the
   model's, not the loader's.
3. The same trainer end to end through ``fit`` (loader with prefetch thread, logging) for a
   fixed number of steps: what ``mtfm train`` achieves.

Model FLOPs per step: ``mtfm.model.flops.count_flops(model, batch)["train_estimate"]``
(3 x forward matmul FLOPs; element-wise work not counted). Achieved FLOP/s = their sum over
the timed steps / the time.

    python benchmarks/bench_train.py --users 2000 --steps 30 [--threads T] [--data DIR] [--bf16] [--sparse-embeddings]
        [--no-end-to-end] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from mtfm.data.aggregate import prepare
from mtfm.data.loader import BatchLoader
from mtfm.data.sources.synthetic import load_source
from mtfm.model.config import load_model_config
from mtfm.model.flops import count_flops, count_parameters
from mtfm.train.config import TrainConfig, cpu_threads
from mtfm.train.distributed import DistContext
from mtfm.train.models import build_model
from mtfm.train.trainer import Trainer, fit, seed_everything


def matmul_gflops(n: int = 1024, rounds: int = 5, reps: int = 8, dtype: torch.dtype = torch.float32,
                  threads: int | None = None) -> float:
    """Best-of-``rounds`` GFLOP/s of an n x n matmul (2 n^3 FLOPs each) in ``dtype`` on ``threads``
    threads (default: every core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _matmul_best(n, rounds, reps, dtype)
    finally:
        torch.set_num_threads(before)


def _matmul_best(n: int, rounds: int, reps: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def step_throughput(data: str, model_name: str, cfg: TrainConfig, steps: int, warmup: int, run_dir: Path) -> dict:
    batch_size = cfg.batch_size
    loader = BatchLoader(data, "train", batch_size, shuffle=True, seed=0)
    # Copies in torch memory: the figure is the model's, whatever backs the loader's buffers.
    batches = [copy.deepcopy(b) for _, b in zip(range(warmup + steps), loader.iterate(0))]
    if len(batches) < warmup + steps:
        raise ValueError(f"{data}: only {len(batches)} train batches of {batch_size}; need {warmup + steps}")
    seed_everything(0, True)
    model = build_model("mtfm", load_model_config(model_name).model_dump(mode="json"), loader.schema)
    trainer = Trainer(model, loader, loader, loader.schema, cfg, run_dir, {"arch": "mtfm"}, DistContext())
    for b in batches[:warmup]:
        trainer.train_step(b)
    timed = batches[warmup:]
    flops = sum(count_flops(model, b)["train_estimate"] for b in timed)
    t0 = time.perf_counter()
    for b in timed:
        trainer.train_step(b)
    seconds = time.perf_counter() - t0
    return {
        "steps": steps, "seconds": seconds,
        "exposures_per_s": sum(b.num_exposures for b in timed) / seconds,
        "tokens_per_s": sum(b.num_tokens for b in timed) / seconds,
        "samples_per_s": sum(b.batch_size for b in timed) / seconds,
        "tokens_per_batch": sum(b.num_tokens for b in timed) / steps,
        "train_gflop_per_step": flops / steps / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "parameters": count_parameters(model),
    }


def end_to_end(data: str, model_name: str, cfg: TrainConfig, steps: int, run_dir: Path) -> dict:
    seed_everything(0, True)
    loader = BatchLoader(data, "train", cfg.batch_size, shuffle=True, seed=0)
    valid = BatchLoader(data, "valid", 256, shuffle=False, seed=0)
    model = build_model("mtfm", load_model_config(model_name).model_dump(mode="json"), loader.schema)
    cfg = cfg.model_copy(update={"max_steps": steps, "epochs": 10**6, "log_every": 5})
    result = fit(model, loader, valid, loader.schema, cfg, run_dir, run_config={"arch": "mtfm"})
    return result.metrics["throughput"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared data directory (default: a fresh synthetic world)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users when --data is not given")
    p.add_argument("--model", default="small", help="model config / preset (default small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training (default: what `mtfm train` uses, one core less than the "
                        "machine); the matmul reference always uses every core")
    p.add_argument("--bf16", action="store_true", help="train with bf16 autocast")
    p.add_argument("--sparse-embeddings", action="store_true",
                   help="sparse embedding updates (lazy Adam on the tables; TrainConfig.sparse_embedding_updates)")
    p.add_argument("--no-end-to-end", action="store_true", help="time the train steps only")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    threads = args.threads or cpu_threads(TrainConfig()) or torch.get_num_threads()
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="mtfm-bench-train-") as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            prepare(load_source(None, None, args.users, 0), data)
        extra = {"bf16": True} if args.bf16 else {}
        if args.sparse_embeddings:
            extra.update(sparse_embedding_updates=True, embedding_optimizer="adam")
        cfg = TrainConfig(batch_size=args.batch_size, progress=False, **extra)
        before = _matmul_rates(args.matmul_n, threads)
        step = step_throughput(data, args.model, cfg, args.steps, args.warmup, Path(tmp) / "steps")
        e2e = None if args.no_end_to_end else end_to_end(data, args.model, cfg, args.steps, Path(tmp) / "e2e")
        after = _matmul_rates(args.matmul_n, threads)
    rates = {k: min(before[k], after[k]) for k in before}  # the lower best: a quiet moment does not flatter
    reference = rates["fp32_all_cores"]
    report = {
        "machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_1m": os.getloadavg()[0]},
        "config": vars(args),
        "matmul_gflops": {"before": before, "after": after, "reference": rates},
        "train_step": step,
        "fraction_of_matmul_rate": step["achieved_gflops"] / reference,
        "fractions": {k: step["achieved_gflops"] / v for k, v in rates.items()},
        "end_to_end": e2e,
    }
    print(f"matmul {args.matmul_n}^3 GFLOP/s (before / after; reference = the lower): "
          + ", ".join(f"{k} {before[k]:.1f} / {after[k]:.1f}" for k in before))
    print("| measure | value |\n|---|---|")
    rows = [
        ("train steps timed", f"{step['steps']} x {args.batch_size} samples, {step['tokens_per_batch']:.0f} tokens/batch"),
        ("exposures/s (train step)", f"{step['exposures_per_s']:,.0f}"),
        ("tokens/s (train step)", f"{step['tokens_per_s']:,.0f}"),
        ("model GFLOP per train step (3 x forward)", f"{step['train_gflop_per_step']:.2f}"),
        ("achieved GFLOP/s", f"{step['achieved_gflops']:.2f}"),
        *[(f"fraction of the {k.replace('_', ' ')} matmul rate ({rates[k]:.1f})", f"{100 * v:.1f}%")
          for k, v in report["fractions"].items()],
    ]
    if e2e is not None:
        rows += [("exposures/s (mtfm train end to end)", f"{e2e['exposures_per_s']:,.0f}"),
                 ("tokens/s (mtfm train end to end)", f"{e2e['tokens_per_s']:,.0f}")]
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"load average (1 min) at the end: {report['machine']['load_average_1m']:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _matmul_rates(n: int, train_threads: int) -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s on every core and on the training's own thread count."""
    return {
        "fp32_all_cores": matmul_gflops(n),
        "fp32_training_threads": matmul_gflops(n, threads=train_threads),
        "bf16_all_cores": matmul_gflops(n, dtype=torch.bfloat16),
        "bf16_training_threads": matmul_gflops(n, dtype=torch.bfloat16, threads=train_threads),
    }


if __name__ == "__main__":
    main()
