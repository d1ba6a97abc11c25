"""M-Falcon latency: one request (one user, N candidates) scored three ways, side by side.

* ``full``: one forward pass over the whole request (``model(batch)``);
* ``naive m``: micro-batches of m candidates, each a forward pass of its own (the user prefix
  recomputed for every micro-batch);
* ``falcon m``: the prefix computed once (:func:`mtfm.serve.falcon.compute_prefix`), then
  micro-batches of m candidates over it (:func:`~mtfm.serve.falcon.score_candidates`); the
  prefix time is included.

The request has the schema's full sequences (every history and real-time type at its
``max_len``) and N candidates of one scenario (random features, ``mtfm.model.testing``).
Times are the best of ``--repeats`` after a warm-up, in milliseconds, fp32, eval mode.

    python benchmarks/bench_falcon.py --model small --sizes 16 128 1024 4096 --micro 16 64 256 0
    python benchmarks/bench_falcon.py --model paper --sizes 16 128 1024 --micro 16 64 256 0

``--micro 0`` stands for m = N (all candidates in one micro-batch).
"""

from __future__ import annotations

import argparse
import time

import torch

from mtfm.data.sources.synthetic import load_packaged_schema
from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch, take_candidates
from mtfm.model.config import load_model_config
from mtfm.model.testing import BatchShape, random_batch
from mtfm.serve.falcon import compute_prefix, score_candidates


def _best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--scenario", default="HP")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1024, 4096])
    p.add_argument("--micro", type=int, nargs="+", default=[16, 64, 256, 0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-naive-passes", type=int, default=64,
                   help="skip naive rows needing more forward passes than this (they only grow linearly)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    schema = load_packaged_schema()
    model = MTFM(schema, load_model_config(args.model)).eval()
    lengths = {s.name: [s.max_len] for s in (*schema.history, *schema.realtime)}
    print(f"model {args.model} ({model.config.hta}, d_model {model.config.d_model}), scenario {args.scenario}, "
          f"{args.threads} thread(s); context tokens per request: {sum(v[0] for v in lengths.values())}\n")
    print("| N | m | full pass ms | naive ms | falcon ms (prefix incl.) | falcon vs naive | falcon vs full |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        batch = random_batch(schema, 1, seed=n, shape=BatchShape(exposures=n), lengths={**lengths, args.scenario: [n]})
        batch = restrict_batch(batch, [args.scenario])
        with torch.no_grad():
            full = _best_ms(lambda: model(batch), args.repeats)
            for m in dict.fromkeys(n if m == 0 or m > n else m for m in args.micro):
                chunks = [torch.arange(s, min(n, s + m)) for s in range(0, n, m)]
                naive = None
                if len(chunks) <= args.max_naive_passes:
                    naive = _best_ms(lambda: [model(take_candidates(batch, args.scenario, c)) for c in chunks],
                                     args.repeats)
                falcon = _best_ms(lambda: score_candidates(model, batch, compute_prefix(model, batch), m), args.repeats)
                naive_s = "-" if naive is None else f"{naive:.1f}"
                ratio = "-" if naive is None else f"{naive / falcon:.2f}x"
                print(f"| {n} | {m} | {full:.1f} | {naive_s} | {falcon:.1f} | {ratio} | {full / falcon:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
