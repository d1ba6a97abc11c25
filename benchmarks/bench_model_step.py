"""Training-step throughput of the MTFM model alone (tokens/s), on real prepared batches.

A step is forward + loss + backward + Adam on one loader batch already in memory, so the
figure is the model's, not the loader's. Single thread (``torch.set_num_threads(1)``; run
with ``OMP_NUM_THREADS=1``): on the shared 2-core machine, two OpenMP threads mostly wait
for each other.

To compare two versions of the model back to back in one session, run this script once per
source tree (``PYTHONPATH=<other checkout>/src`` selects the other one); it prints the loss
of the first step so the two runs can be checked to compute the same thing.

    mtfm prepare --source synthetic --users 2000 --seed 0 --out /tmp/p_syn
    OMP_NUM_THREADS=1 python benchmarks/bench_model_step.py --data /tmp/p_syn --steps 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import mtfm
from mtfm.data.loader import BatchLoader
from mtfm.model.config import load_model_config
from mtfm.model.mtfm import MTFM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="directory written by `mtfm prepare`")
    ap.add_argument("--model", default="small", help="model preset or config file")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (each on its own batch)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default=None, help="override attention_backend")
    args = ap.parse_args()

    torch.set_num_threads(1)
    loader = BatchLoader(args.data, "train", args.batch_size, shuffle=True, seed=0)
    batches = [copy.deepcopy(b) for _, b in zip(range(args.warmup + args.steps), loader.iterate(0))]
    config = load_model_config(args.model)
    if args.backend:
        config = config.model_copy(update={"attention_backend": args.backend})
    torch.manual_seed(0)
    model = MTFM(loader.schema, config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = model.loss(batch, model(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())

    first_loss = None
    for b in batches[: args.warmup]:
        _, loss = step(b)
        first_loss = loss if first_loss is None else first_loss
    times, tokens = [], []
    for b in batches[args.warmup :]:
        dt, _ = step(b)
        times.append(dt)
        tokens.append(int(b.layout.offsets[-1]))
    total = sum(tokens) / sum(times)
    print(f"source: {mtfm.__file__}")
    print(f"model {args.model} backend {config.attention_backend}; batch {args.batch_size}, "
          f"{statistics.mean(tokens):.0f} tokens/batch; first-step loss {first_loss:.10f}")
    print(f"step s: min {min(times):.3f} median {statistics.median(times):.3f}; "
          f"tokens/s: {total:.0f} (all steps), {statistics.mean(tokens) / min(times):.0f} (best step)")


if __name__ == "__main__":
    main()
