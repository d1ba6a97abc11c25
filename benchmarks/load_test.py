"""Load test of `mtfm serve` on loopback: concurrency 1..64, bounded in time (2 minutes by default).

Starts `mtfm serve` as a child process on a free 127.0.0.1 port (its own process, so its memory
is measured alone) and sends `POST /v1/score` requests built from real test exposures of the
prepared data: each request is one user of a pool of ``--users`` (so users repeat and the prefix
cache can hit), one scenario, ``--candidates`` candidates of that scenario, at the time of one
of the user's test exposures; before a share of them (``--append-share``) the client appends one
new action of that user (``POST /v1/actions``, which drops the user's cached prefix). Errors
count both kinds of request. Per concurrency level (a fixed share of the time budget) it reports
throughput, p50 / p99 latency and errors, and from the server's /metrics the prefix-cache hit
rate and the prefix time saved (hits x the mean time of a prefix computation). A last phase
runs a second server without the cache at concurrency 1 for a measured A/B of the latency the
cache saves. The server's RSS is read before the first request and after the last.

    python benchmarks/load_test.py --workdir /tmp/mtfm-load            # builds a small run first
    python benchmarks/load_test.py --run RUN --data DIR --budget-s 120

Without ``--run``, a world of ``--world-users`` synthetic users is prepared in WORKDIR and the
small preset is trained for ``--train-steps`` steps (not timed; the model's accuracy does not
matter here, its size does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import polars as pl

LEVELS = (1, 4, 16, 64)


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    hits: float
    misses: float
    prefix_saved_s: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def build_run(workdir: Path, users: int, steps: int) -> tuple[Path, Path]:
    """Prepare a synthetic world and train the small preset briefly (skipped when present)."""
    from mtfm.cli import main

    data, run = workdir / "data", workdir / "run"
    if not (data / "manifest.json").exists():
        assert main(["prepare", "--source", "synthetic", "--users", str(users), "--out", str(data), "--quiet"]) == 0
    if not (run / "checkpoints").exists():
        assert main(["train", "--data", str(data), "--out", str(run), "--model", "small", "--max-steps", str(steps),
                     "--quiet", "--batch-size", "32"]) == 0
    return run, data


def request_pool(data: Path, store_columns: dict, users: int, candidates: int, seed: int
                 ) -> tuple[list[dict], list[tuple[str, dict]]]:
    """Request bodies from test exposures (``users`` users, each with one request per scenario),
    and behaviour rows to append as new actions (table, row without user and time)."""
    from mtfm.data.store import read_manifest
    from mtfm.serve.store import reload_source

    manifest = read_manifest(data)
    raw = reload_source(data)
    rng = random.Random(seed)
    schema = manifest.schema_obj
    test_start = manifest.split_boundaries.test_start
    bodies = []
    for spec in schema.scenarios:
        cols = list(store_columns[spec.name])
        table = raw.tables[spec.table]
        test = table.filter(pl.col(schema.time.column) >= test_start)
        pool_users = sorted(set(test[schema.user_column].to_list()))
        for user in rng.sample(pool_users, min(users, len(pool_users))):
            ts = int(test.filter(pl.col(schema.user_column) == user)[schema.time.column][0])
            rows = table.sample(candidates, with_replacement=True, seed=rng.randrange(1 << 30)).select(cols)
            bodies.append({"scenario": spec.name, "user_id": int(user), "timestamp": ts, "candidates": rows.to_dicts()})
    actions = []
    for table, cols in store_columns_behaviour(data).items():
        sample = raw.tables[table].sample(50, seed=seed).select([c for c in cols if c not in (
            schema.user_column, schema.time.column)])
        actions += [(table, row) for row in sample.to_dicts()]
    return bodies, actions


def store_columns_behaviour(data: Path) -> dict[str, list[str]]:
    from mtfm.data.store import read_manifest
    from mtfm.data.validate import sequence_tables

    schema = read_manifest(data).schema_obj
    return {t: [schema.user_column, schema.time.column, *dict.fromkeys(f.name for s in specs for f in s.features)]
            for t, specs in sequence_tables(schema).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, data: Path, store: Path, cache_mb: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mtfm", "serve", "--run", str(run), "--data", str(data), "--store", str(store),
           "--port", str(port), "--cache-mb", str(cache_mb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"mtfm serve did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def scrape(url: str) -> dict[str, float]:
    """The counters of /metrics this test reads."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r"(mtfm_prefix_[a-z_]+) ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def run_level(url: str, bodies: list[dict], actions: list[tuple[str, dict]], append_share: float,
                    concurrency: int, seconds: float, seed: int) -> tuple[list[float], int]:
    """``concurrency`` clients sending requests back to back for ``seconds``; latencies and errors.
    Before a share ``append_share`` of the scores, the client appends one action of that user
    just before the request time (the next score sees it; the user's cached prefix is dropped)."""
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    rng = random.Random(seed)

    async def client(client_id: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        local = random.Random(rng.randrange(1 << 30) + client_id)
        while time.monotonic() < stop:
            body = local.choice(bodies)
            if local.random() < append_share:
                table, row = local.choice(actions)
                action = {**row, "ts": body["timestamp"] - 1}
                try:
                    r = await http.post("/v1/actions", json={"table": table, "user_id": body["user_id"],
                                                             "actions": [action]})
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/score", json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    return latencies, errors


def measure(url: str, bodies: list[dict], actions: list[tuple[str, dict]], append_share: float, concurrency: int,
            seconds: float, seed: int) -> Level:
    before = scrape(url)
    t0 = time.perf_counter()
    latencies, errors = asyncio.run(run_level(url, bodies, actions, append_share, concurrency, seconds, seed))
    elapsed = time.perf_counter() - t0
    after = scrape(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    computed = after.get("mtfm_prefix_computed_total", 0.0)
    mean_prefix = after.get("mtfm_prefix_compute_seconds_total", 0.0) / computed if computed else 0.0
    hits = delta.get("mtfm_prefix_cache_hits_total", 0.0)
    ms = np.asarray(latencies) * 1e3
    return Level(concurrency, len(latencies), errors, elapsed, float(np.percentile(ms, 50)),
                 float(np.percentile(ms, 99)), hits, delta.get("mtfm_prefix_cache_misses_total", 0.0),
                 hits * mean_prefix)


def table(levels: list[Level], candidates: int) -> str:
    lines = ["| concurrency | requests | errors | req/s | candidates/s | p50 ms | p99 ms | cache hit rate | "
             "prefix time saved s |", "|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        lookups = lv.hits + lv.misses
        rate = f"{lv.hits / lookups:.0%}" if lookups else "-"
        lines.append(f"| {lv.concurrency} | {lv.requests} | {lv.errors} | {lv.throughput:.1f} | "
                     f"{lv.throughput * candidates:.0f} | {lv.p50_ms:.1f} | {lv.p99_ms:.1f} | {rate} | "
                     f"{lv.prefix_saved_s:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mtfm-load"))
    p.add_argument("--world-users", type=int, default=300)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--users", type=int, default=30, help="users per scenario in the request pool")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    p.add_argument("--append-share", type=float, default=0.1,
                   help="share of scores preceded by an appended action of that user (default 0.1)")
    p.add_argument("--budget-s", type=float, default=120.0, help="total time of the load phases")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if (args.run is None) != (args.data is None):
        p.error("give --run and --data together, or neither (a run is built in --workdir)")
    run, data = (args.run, args.data) if args.run else build_run(args.workdir, args.world_users, args.train_steps)
    store = args.workdir / "behaviour.sqlite"
    args.workdir.mkdir(parents=True, exist_ok=True)
    from mtfm.serve.store import open_or_build_store

    columns = open_or_build_store(data, store, rebuild=True).request_columns  # fresh: no earlier run's appends
    bodies, actions = request_pool(data, columns, args.users, args.candidates, args.seed)
    share = args.budget_s / (len(args.levels) + 1)  # + the no-cache phase
    proc, url = start_server(run, data, store, cache_mb=256)
    try:
        rss_before = rss_mib(proc.pid)
        levels = [measure(url, bodies, actions, args.append_share, c, share, args.seed + c) for c in args.levels]
        rss_after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    proc, url = start_server(run, data, store, cache_mb=0)
    try:
        plain = measure(url, bodies, actions, args.append_share, 1, share, args.seed + 1)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{len(bodies)} distinct requests ({args.users} users per scenario, {args.candidates} candidates each), "
          f"{args.append_share:.0%} preceded by an appended action; "
          f"{share:.0f} s per level; torch threads in the server: default; host cores: {os.cpu_count()}")
    print(table(levels, args.candidates))
    print(f"\nserver RSS: {rss_before:.0f} MiB before the first request, {rss_after:.0f} MiB after the last")
    cached = next((lv for lv in levels if lv.concurrency == 1), levels[0])
    print(f"concurrency 1, cache on vs off: p50 {cached.p50_ms:.1f} vs {plain.p50_ms:.1f} ms, "
          f"{cached.throughput:.1f} vs {plain.throughput:.1f} req/s (off: {plain.requests} requests, "
          f"{plain.errors} errors)")


if __name__ == "__main__":
    main()
