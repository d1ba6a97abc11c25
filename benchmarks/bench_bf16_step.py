"""fp32 vs bf16 autocast: forward + loss + backward of one model preset, alternating, one thread.

Both precisions run in the same process on the same batches, round after round, so the ratio
holds on a shared machine. No optimizer step (it runs in fp32 either way).

    OMP_NUM_THREADS=1 python benchmarks/bench_bf16_step.py --data /tmp/p_syn --model paper --batches 5 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mtfm.data.loader import BatchLoader
from mtfm.model.config import load_model_config
from mtfm.model.mtfm import MTFM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=5, help="timed batches per round and precision")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loader = BatchLoader(args.data, "train", args.batch_size, shuffle=True, seed=0)
    batches = [copy.deepcopy(b) for _, b in zip(range(args.batches + 2), loader.iterate(0))]
    torch.manual_seed(0)
    model = MTFM(loader.schema, load_model_config(args.model))

    def step(batch, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch, model(batch))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for b in batches[:2]:  # warm-up, both precisions
        step(b, False)
        step(b, True)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in times:
            t0 = time.perf_counter()
            for b in batches[2:]:
                step(b, name == "bf16")
            times[name].append(1000 * (time.perf_counter() - t0) / args.batches)
    print(f"model {args.model}, batch {args.batch_size}: ms per step by round")
    for name, ms in times.items():
        print(f"  {name}: " + ", ".join(f"{x:.1f}" for x in ms))
    print("  fp32 / bf16: " + ", ".join(f"{a / b:.2f}x" for a, b in zip(times["fp32"], times["bf16"])))


if __name__ == "__main__":
    main()
