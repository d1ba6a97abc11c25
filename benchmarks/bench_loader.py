"""Loader throughput: batches/s, samples/s, exposures/s and tokens/s over one epoch of a split.

Reads a directory written by ``mtfm prepare`` (or prepares a synthetic world first when
``--data`` is missing) and iterates it with :class:`mtfm.data.loader.BatchLoader`, shuffled
and not, with and without the prefetch thread. The consumer does nothing with the batches,
so the figures are the loader's ceiling, not a training rate.

Usage::

    python benchmarks/bench_loader.py --data /tmp/bench_prepare --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mtfm.data.loader import BatchLoader


def measure(data: Path, split: str, batch_size: int, shuffle: bool, prefetch: int, max_batches: int | None) -> dict:
    loader = BatchLoader(data, split, batch_size, shuffle=shuffle, seed=0, prefetch=prefetch)
    batches = samples = exposures = tokens = 0
    t0 = time.perf_counter()
    for batch in loader.iterate(0):
        batches += 1
        samples += batch.batch_size
        exposures += batch.num_exposures
        tokens += batch.num_tokens
        if max_batches is not None and batches >= max_batches:
            break
    dt = time.perf_counter() - t0
    return {"shuffle": shuffle, "prefetch": prefetch, "batches": batches, "seconds": dt,
            "batches/s": batches / dt, "samples/s": samples / dt, "exposures/s": exposures / dt,
            "tokens/s": tokens / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench_prepare", help="a prepared directory")
    ap.add_argument("--users", type=int, default=20_000, help="synthetic users, when --data must be prepared first")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=256, help="samples (user-windows) per batch")
    ap.add_argument("--max-batches", type=int, default=None, help="stop early (default: one full epoch)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads before measuring (the token layout runs torch ops; default: "
                         "torch's own choice)")
    args = ap.parse_args()
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        from mtfm.data.aggregate import prepare
        from mtfm.data.sources.synthetic import load_source

        prepare(load_source(None, None, args.users, 0), data)
    load = os.getloadavg()
    import torch

    print(f"data {data}, split {args.split}, batch size {args.batch_size}, torch threads {torch.get_num_threads()}; "
          f"load average {load[0]:.2f} {load[1]:.2f}")
    print("| shuffle | prefetch | batches | s | batches/s | samples/s | exposures/s | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for shuffle, prefetch in ((False, 2), (True, 2), (True, 0)):
        r = measure(data, args.split, args.batch_size, shuffle, prefetch, args.max_batches)
        print(f"| {r['shuffle']} | {r['prefetch']} | {r['batches']:,} | {r['seconds']:.2f} | {r['batches/s']:,.1f} | "
              f"{r['samples/s']:,.0f} | {r['exposures/s']:,.0f} | {r['tokens/s']:,.0f} |")


if __name__ == "__main__":
    main()
