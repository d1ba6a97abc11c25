"""Forward+backward time and peak memory of one target-attention layer vs one full-attention layer.

For each token count N (per user) the batch holds ``--users`` users, each with
``L_T = N / 8`` T-tokens, ``L_R = N / 8`` R-tokens and ``L_H = 3N / 4`` H-tokens (H before
the window, R overlapping it, T inside it, so the dynamic mask is the real one). Both layers
get the same input; the target layer computes its own context keys/values (a single layer,
nothing fused or shared with neighbours); the full layer is the unpruned eq. 7-10 layer.

Every (backend, N, layer) runs in its own fresh Python process, one after the other, so that
the peak-memory figure belongs to that configuration alone:

* time: the fastest of the timed forward+backward passes (at least ``--repeats`` and at least
  one second of them, after one warm-up pass); the minimum, because the machine is shared and
  other processes only ever add time (the median is returned by the workers as well);
  the per-batch attention plan (buckets and their gather indices; built once per forward and
  shared by all layers of a model) is built before timing and reported separately (``plan ms``);
* peak memory: the process's peak RSS (``ru_maxrss``, kernel-tracked high-water mark) during
  warm-up + timed passes minus its RSS just before them (inputs, weights and plan already
  allocated), i.e. the extra memory one forward+backward needs;
* executed GFLOP: matmul FLOPs of one forward, counted by ``torch.utils.flop_counter``
  (it includes padding and masked work a backend computes).

Usage (prints a Markdown table; the machine is shared, so the load average is printed too)::

    python benchmarks/bench_layers.py --sizes 256 1024 4096 --users 2 --backends jagged reference

With ``--stacks`` it times whole models instead (tokenizers, stack, heads, loss; the paper's
Table 3 comparison of HTA stacks), on a random batch of the test schema with the same token mix::

    python benchmarks/bench_layers.py --stacks '(0:16)x1' '(1:1)x8' '(3:1)x4' '(5:1)x3' '(16:0)x1' \\
        --sizes 1024 --users 4 --d-model 64 --backends jagged
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _timed(step, repeats: int, min_seconds: float = 1.0, max_repeats: int = 50) -> list[float]:
    """Seconds per call of ``step`` after one warm-up call: at least ``repeats`` calls and
    ``min_seconds`` in total (small configurations get more samples on a noisy machine)."""
    step()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _layout(users: int, n: int):
    """Token layout of ``users`` users with ``n`` tokens each (H 3/4, R 1/8, T 1/8)."""
    import torch

    from mtfm.data.batch import TOKEN_H, TOKEN_R, TOKEN_T, TokenLayout
    from mtfm.kernels import AttentionLayout

    g = torch.Generator().manual_seed(0)
    lt = lr = n // 8
    lh = n - lt - lr
    types, times, groups = [], [], []
    for _ in range(users):
        types += [TOKEN_H] * lh + [TOKEN_R] * lr + [TOKEN_T] * lt
        groups += [0] * lh + [1] * lr + [2] * lt
        times.append(torch.sort(torch.randint(0, 1000, (lh,), generator=g)).values)
        times.append(torch.sort(torch.randint(900, 2000, (lr,), generator=g)).values)
        times.append(torch.randint(1000, 2000, (lt,), generator=g))
    total = users * n
    offsets = torch.arange(0, total + 1, n)
    layout = TokenLayout(offsets, torch.tensor(groups), torch.tensor(types), torch.cat(times), torch.zeros(total, dtype=torch.long))
    return AttentionLayout.from_token_layout(layout), layout.group_ids


def worker(kind: str, n: int, users: int, backend: str, d_model: int, heads: int, groups: int, repeats: int) -> dict:
    """Measure one configuration in this (fresh) process; returns the figures as a dict."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtfm.kernels.jagged import plan_for
    from mtfm.model.config import ModelConfig
    from mtfm.model.hta import TokenGroups
    from mtfm.model.layers import FullAttentionLayer, TargetAttentionLayer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=d_model, num_heads=heads, num_kv_groups=groups, attention_backend=backend,
                      attention_norm_len=n)
    names = ["H:h", "R:r", "T:s"]
    layout, gid = _layout(users, n)
    tgt, ctx = layout.queries("target").index, layout.context().index
    token_groups = TokenGroups(gid, gid[tgt] - 2)
    x = torch.randn(layout.num_tokens, d_model, requires_grad=True)
    t0 = time.perf_counter()
    if backend == "jagged":
        plan_for(layout.queries("all" if kind == "full" else "target"), layout, cfg.jagged_padding_slack)
    plan_ms = (time.perf_counter() - t0) * 1e3

    if kind == "full":
        layer = FullAttentionLayer(cfg, names)

        def forward():
            return layer(x, token_groups, layout)
    else:
        layer = TargetAttentionLayer(cfg, names, ["T:s"])

        def forward():
            k_ctx, v_ctx = layer.context_kv(x[ctx], gid[ctx])
            x_t = layer(x[tgt], gid[tgt], token_groups.target, k_ctx, v_ctx, layout)
            return x.index_copy(0, tgt, x_t)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    probe = torch.randn(layout.num_tokens, d_model)
    base = _rss_bytes()

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        (forward() * probe).sum().backward()

    times = _timed(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "ms": min(times) * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "peak_mb": max(peak - base, 0) / 2**20,
        "gflop": counter.get_total_flops() / 1e9,
        "plan_ms": plan_ms,
    }


def stack_worker(hta: str, n: int, users: int, backend: str, d_model: int, heads: int, groups: int, repeats: int) -> dict:
    """Forward+backward of a whole MTFM model with stack ``hta`` on ``users`` users of ``n`` tokens."""
    import torch

    from mtfm.model import MTFM, count_flops
    from mtfm.model.config import ModelConfig
    from mtfm.model.testing import random_batch, tiny_schema

    torch.manual_seed(0)
    schema = tiny_schema()
    lt = n // 8
    lengths = {"orders": [3 * n // 8] * users, "clicks": [n - 3 * n // 8 - 2 * lt] * users, "recent": [lt] * users,
               "feed": [lt - 2 * (lt // 3)] * users, "food": [lt // 3] * users, "coupon": [lt // 3] * users}
    batch = random_batch(schema, users, seed=0, lengths=lengths)
    cfg = ModelConfig(d_model=d_model, num_heads=heads, num_kv_groups=groups, attention_backend=backend,
                      attention_norm_len=n).with_hta(hta)
    model = MTFM(schema, cfg)
    base = _rss_bytes()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(batch, model(batch)).backward()

    times = _timed(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3, "peak_mb": max(peak - base, 0) / 2**20,
            "gflop": count_flops(model, batch)["total"] / 1e9, "tokens": batch.num_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="tokens per user (N)")
    ap.add_argument("--users", type=int, default=2, help="users per batch")
    ap.add_argument("--backends", nargs="+", default=["jagged", "reference"])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stacks", nargs="*", metavar="HTA",
                    help="instead of single layers, time whole models with these stacks, e.g. '(3:1)x4' '(0:16)x1'")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, n = args.worker[0], int(args.worker[1])
        measure = stack_worker if kind.startswith("(") else worker
        result = measure(kind, n, args.users, args.backend, args.d_model, args.heads, args.groups, args.repeats)
        print(json.dumps(result))
        return
    if args.stacks:
        stacks(args)
        return

    print(f"load average before: {os.getloadavg()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"users={args.users} d_model={args.d_model} H={args.heads} G={args.groups} repeats={args.repeats}\n")
    print("| backend | N | L_T | target ms | full ms | time ratio T/F | (median ratio) | target peak MB | full peak MB | "
          "memory ratio T/F | target GFLOP | full GFLOP | plan ms (T / F) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for n in args.sizes:
            t, f = _run_worker(args, "target", n, backend), _run_worker(args, "full", n, backend)
            print(f"| {backend} | {n} | {n // 8} | {t['ms']:.1f} | {f['ms']:.1f} | {t['ms'] / f['ms']:.3f} | "
                  f"{t['median_ms'] / f['median_ms']:.3f} | "
                  f"{t['peak_mb']:.1f} | {f['peak_mb']:.1f} | {t['peak_mb'] / max(f['peak_mb'], 1e-9):.3f} | "
                  f"{t['gflop']:.3f} | {f['gflop']:.3f} | {t['plan_ms']:.1f} / {f['plan_ms']:.1f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


def _run_worker(args: argparse.Namespace, kind: str, n: int, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(n), "--backend", backend, "--users", str(args.users),
           "--d-model", str(args.d_model), "--heads", str(args.heads), "--groups", str(args.groups),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stacks(args: argparse.Namespace) -> None:
    """Whole-model forward+backward per HTA stack (the paper's Table 3 comparison, on CPU)."""
    print(f"load average before: {os.getloadavg()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"users={args.users} d_model={args.d_model} H={args.heads} G={args.groups} repeats={args.repeats}\n")
    print("| backend | N | stack | ms (min) | ms (median) | speed vs first stack | peak MB | model GFLOP (forward) |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for n in args.sizes:
            first = None
            for hta in args.stacks:
                r = _run_worker(args, hta, n, backend)
                first = first or r["ms"]
                print(f"| {backend} | {n} | {hta} | {r['ms']:.0f} | {r['median_ms']:.0f} | {first / r['ms']:.2f}x | {r['peak_mb']:.0f} | "
                      f"{r['gflop']:.2f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
