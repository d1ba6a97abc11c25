"""Forward+backward time and peak memory of one target-attention layer vs one full-attention layer.

For each token count N (per user) the batch holds ``--users`` users, each with
``L_T = N / 8`` T-tokens, ``L_R = N / 8`` R-tokens and ``L_H = 3N / 4`` H-tokens (H before
the window, R overlapping it, T inside it, so the dynamic mask is the real one). Both layers
get the same input; the target layer computes its own context keys/values (a single layer,
nothing fused or shared with neighbours); the full layer is the unpruned eq. 7-10 layer.

Every (backend, N, layer) runs in its own fresh Python process, one after the other, so that
the peak-memory figure belongs to that configuration alone:

* time: median over ``--repeats`` timed forward+backward passes, after one warm-up pass;
  the per-batch attention plan (mask, buckets; built once per forward and shared by all layers
  of a model) is built before timing and reported separately (``plan ms``);
* peak memory: the process's peak RSS (``ru_maxrss``, kernel-tracked high-water mark) during
  warm-up + timed passes minus its RSS just before them (inputs, weights and plan already
  allocated), i.e. the extra memory one forward+backward needs;
* executed GFLOP: matmul FLOPs of one forward, counted by ``torch.utils.flop_counter``
  (it includes padding and masked work a backend computes).

Usage (prints a Markdown table; the machine is shared, so the load average is printed too)::

    python benchmarks/bench_layers.py --sizes 256 1024 4096 --users 2 --backends jagged reference
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
    times = []
    for i in range(repeats + 1):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        (forward() * probe).sum().backward()
        if i:  # the first pass is the warm-up
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "ms": statistics.median(times) * 1e3,
        "peak_mb": max(peak - base, 0) / 2**20,
        "gflop": counter.get_total_flops() / 1e9,
        "plan_ms": plan_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="tokens per user (N)")
    ap.add_argument("--users", type=int, default=2, help="users per batch")
    ap.add_argument("--backends", nargs="+", default=["jagged", "reference"])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        kind, n = args.worker[0], int(args.worker[1])
        result = worker(kind, n, args.users, args.backend, args.d_model, args.heads, args.groups, args.repeats)
        print(json.dumps(result))
        return

    print(f"load average before: {os.getloadavg()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"users={args.users} d_model={args.d_model} H={args.heads} G={args.groups} repeats={args.repeats}\n")
    print("| backend | N | L_T | target ms | full ms | time ratio T/F | target peak MB | full peak MB | "
          "memory ratio T/F | target GFLOP | full GFLOP | plan ms (T / F) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for n in args.sizes:
            res = {}
            for kind in ("target", "full"):
                cmd = [sys.executable, __file__, "--worker", kind, str(n), "--backend", backend, "--users", str(args.users),
                       "--d-model", str(args.d_model), "--heads", str(args.heads), "--groups", str(args.groups),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            t, f = res["target"], res["full"]
            print(f"| {backend} | {n} | {n // 8} | {t['ms']:.1f} | {f['ms']:.1f} | {t['ms'] / f['ms']:.3f} | "
                  f"{t['peak_mb']:.1f} | {f['peak_mb']:.1f} | {t['peak_mb'] / max(f['peak_mb'], 1e-9):.3f} | "
                  f"{t['gflop']:.3f} | {f['gflop']:.3f} | {t['plan_ms']:.1f} / {f['plan_ms']:.1f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
