"""Throughput and peak memory of ``mtfm prepare`` on a synthetic world.

Generation is timed separately from preparation (the target concerns prepare only):

1. generate the world in memory (``mtfm.data.sources.synthetic.load_source``);
2. run :func:`mtfm.data.aggregate.prepare` on it, sampling the process RSS every 20 ms from a
   thread (/proc/self/statm), so the peak *during prepare* is known even when generation
   peaked higher. The raw tables stay in memory throughout and are part of that peak. The
   CPU time of prepare is printed too: on a shared machine it shows how many of the cores
   the run actually got.

Usage::

    python benchmarks/bench_prepare.py --users 110000 --out /tmp/bench_prepare

Prints one Markdown table row per run plus prepare's own phase timings.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import threading
import time
from pathlib import Path

from mtfm.data.aggregate import prepare
from mtfm.data.sources.synthetic import load_source

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Highest RSS seen while the context is open (sampled from a thread)."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=110_000, help="synthetic users (110k ~ 10M exposures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench_prepare", help="scratch output directory (replaced)")
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args()

    t0 = time.perf_counter()
    raw = load_source(None, None, args.users, args.seed)
    gen_s = time.perf_counter() - t0
    gen_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = {t: len(df) for t, df in raw.tables.items()}
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    before = rss_bytes()
    with PeakRss() as peak:
        c1, t1 = cpu_seconds(), time.perf_counter()
        manifest = prepare(raw, out, shards=args.shards)
        prep_s, prep_cpu = time.perf_counter() - t1, cpu_seconds() - c1
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    load = os.getloadavg()
    print(f"tables: {rows}")
    print(f"generation: {gen_s:.1f} s, peak RSS so far {gen_peak / 2**30:.2f} GiB")
    print(f"prepare phases, wall s: {manifest.timings_s}")
    print(f"prepare phases, CPU s:  {manifest.cpu_s}")
    print(f"prepare CPU time (user + system, all threads): {prep_cpu:.1f} s for {prep_s:.1f} s wall "
          f"({prep_cpu / prep_s:.2f} cores busy on average)")
    print(f"RSS before prepare {before / 2**30:.2f} GiB (raw tables in memory)")
    stored: dict[str, list[int]] = {}
    for info in manifest.splits.values():
        for shard in info.shards:
            for prefix, seq in shard.sequences.items():
                rows_items = stored.setdefault(prefix, [0, 0])
                rows_items[0] += seq.rows
                rows_items[1] += seq.items
    print("sequence rows stored once per shard / items the samples point at (format 1 stored the items): "
          + ", ".join(f"{p} {r:,} / {i:,} ({i / max(r, 1):.1f}x)" for p, (r, i) in stored.items()))
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print("| users | input exposures | samples | prepare s | exposures/s | peak RSS during prepare GiB | "
          "shards MiB | generation s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.users:,} | {manifest.input_exposures:,} | {manifest.samples:,} | {prep_s:.2f} | "
          f"{manifest.input_exposures / prep_s:,.0f} | {peak.peak / 2**30:.2f} | {size / 2**20:,.0f} | {gen_s:.1f} |")


if __name__ == "__main__":
    main()
