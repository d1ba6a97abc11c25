"""GPU figures of issue 15: the Triton kernels vs the PyTorch paths, measured in one run on one GPU.

Prints three markdown tables (quoted in BENCHMARKS.md, "GPU path (issue 15)"):

a) masked HSTU attention, forward + backward (bf16, paper heads: d_model 768, H = 3, G = 1, so
   head width 256, with the 32-bucket time bias of the paper preset): time and peak memory of
   the ``triton``, ``reference`` and ``jagged`` backends at 256 ... 4096 tokens per user, for a
   full layer (every token queries) and a target layer (T-tokens query), and the largest
   |difference| of each backend's output from the reference's on the same inputs. Each user has
   ``L`` tokens: 1/16 T, 1/8 R (expiring after 32 later actions), the rest H. The per-batch plans
   are built once (as in a forward pass, where every layer reuses them) and not timed;
b) Group LayerNorm, forward + backward: the fused Triton kernel vs the PyTorch module path;
c) end-to-end training (forward, loss, backward, Adam) of the paper preset (``model_paper.yaml``)
   under bf16 autocast on random synthetic batches (:mod:`mtfm.model.testing`, the synthetic
   schema): samples/s, tokens/s and MFU = model FLOP/s (:mod:`mtfm.model.flops`, 3x forward)
   over the bf16 matmul rate of a large ``torch.mm`` measured in the same run; before
   (``jagged`` attention, PyTorch GLN: ``MTFM_DISABLE_TRITON=1``) and after (``auto``: Triton).

    python benchmarks/bench_gpu.py            # all three, about 3 minutes on an H200
    python benchmarks/bench_gpu.py --only a   # one table
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback
from importlib import resources

import torch

from mtfm.data.batch import NEVER, TOKEN_H, TOKEN_R, TOKEN_T, TokenLayout
from mtfm.kernels import AttentionLayout, AttentionParams, hstu_attention

MiB = 1 << 20


def _timed(fn, reps: int, budget_s: float = 20.0) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` (after one warm-up call) and its peak extra memory in MiB."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if time.perf_counter() - start_all > budget_s:
            break
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / MiB


def _layout(users: int, length: int, seed: int) -> AttentionLayout:
    g = torch.Generator().manual_seed(seed)
    lt, lr = max(1, length // 16), max(1, length // 8)
    lh = length - lt - lr
    types, times, expiry, offsets = [], [], [], [0]
    day = 86_400_000
    base = 1_700_000_000_000
    for _ in range(users):
        h = torch.sort(torch.randint(base - 180 * day, base, (lh,), generator=g)).values
        r = torch.sort(torch.randint(base - day, base + day, (lr,), generator=g)).values
        t = torch.randint(base, base + day, (lt,), generator=g)
        r_exp = torch.cat([r[32:], torch.full((min(32, lr),), NEVER)])
        types.append(torch.tensor([TOKEN_H] * lh + [TOKEN_R] * lr + [TOKEN_T] * lt))
        times.append(torch.cat([h, r, t]))
        expiry.append(torch.cat([torch.full((lh,), NEVER), r_exp, torch.full((lt,), NEVER)]))
        offsets.append(offsets[-1] + length)
    n = offsets[-1]
    zeros = torch.zeros(n, dtype=torch.long)
    layout = TokenLayout(torch.tensor(offsets), zeros, torch.cat(types), torch.cat(times), zeros, torch.cat(expiry))
    cuda = TokenLayout(*(x.cuda() for x in (layout.offsets, layout.group_ids, layout.token_type, layout.timestamps,
                                            layout.source_row, layout.expiry)))
    return AttentionLayout.from_token_layout(cuda)


def table_attention(lengths: list[int], reps: int) -> None:
    heads, groups, dim, buckets = 3, 1, 256, 32
    print("\n### a) Masked HSTU attention, forward + backward (bf16, H 3, G 1, head width 256, time bias)\n")
    print("| layer | tokens/user | users | backend | fwd+bwd ms | peak MiB | max abs diff vs reference |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for length in lengths:
        users = max(4, 16384 // length)
        layout = _layout(users, length, seed=length)
        for kind in ("all", "target"):
            queries = layout.queries(kind)
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(queries.num_queries, heads, dim, device="cuda", generator=g).bfloat16().requires_grad_()
            k = torch.randn(layout.num_tokens, groups, dim, device="cuda", generator=g).bfloat16().requires_grad_()
            v = torch.randn(layout.num_tokens, groups, dim, device="cuda", generator=g).bfloat16().requires_grad_()
            table = (0.1 * torch.randn(heads, buckets, device="cuda", generator=g)).requires_grad_()
            params = AttentionParams(alpha=dim**-0.5, norm=1 / 1024, num_kv_groups=groups, bias=table, time_buckets=buckets)
            grad = torch.randn(queries.num_queries, heads, dim, device="cuda", generator=g).bfloat16()
            outputs: dict[str, torch.Tensor] = {}
            for backend in ("reference", "triton", "jagged"):
                def step() -> None:
                    with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training (bf16 scores, fp32 bias)
                        out = hstu_attention(q, k, v, queries, layout, params, backend)
                    out.backward(grad)
                    outputs[backend] = out.detach()
                    q.grad = k.grad = v.grad = table.grad = None
                try:
                    ms, mem = _timed(step, reps)
                    diff = float((outputs[backend].float() - outputs["reference"].float()).abs().max())
                    print(f"| {'full' if kind == 'all' else 'target'} | {length} | {users} | {backend} | {ms:.2f} | "
                          f"{mem:.0f} | {diff:.2e} |", flush=True)
                except torch.OutOfMemoryError:
                    print(f"| {kind} | {length} | {users} | {backend} | OOM | | |", flush=True)
                    outputs.pop(backend, None)
                torch.cuda.empty_cache()


def table_gln(rows_list: list[int], reps: int) -> None:
    from mtfm.model.layers import GroupLayerNorm

    dim, groups = 768, 9
    print("\n### b) Group LayerNorm, forward + backward (bf16 input, fp32 parameters, 9 groups, width 768)\n")
    print("| rows | PyTorch ms | Triton ms | speed-up | PyTorch peak MiB | Triton peak MiB | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    gln = GroupLayerNorm([f"g{i}" for i in range(groups)], dim).cuda()
    with torch.no_grad():
        for p in gln.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for rows in rows_list:
        gid = torch.sort(torch.randint(0, groups, (rows,), device="cuda")).values
        x = torch.randn(rows, dim, device="cuda").bfloat16().requires_grad_()
        dy = torch.randn(rows, dim, device="cuda")
        res = {}
        for name, disabled in (("pytorch", "1"), ("triton", "0")):
            os.environ["MTFM_DISABLE_TRITON"] = disabled
            holder: dict[str, torch.Tensor] = {}

            def step() -> None:
                y = gln(x, gid)
                y.backward(dy)
                holder["y"] = y.detach()
                x.grad = None
                gln.zero_grad(set_to_none=True)
            res[name] = (*_timed(step, reps), holder["y"])
        os.environ.pop("MTFM_DISABLE_TRITON", None)
        (pt_ms, pt_mem, y_pt), (tr_ms, tr_mem, y_tr) = res["pytorch"], res["triton"]
        diff = float((y_pt.float() - y_tr.float()).abs().max())
        print(f"| {rows} | {pt_ms:.3f} | {tr_ms:.3f} | {pt_ms / tr_ms:.2f}x | {pt_mem:.0f} | {tr_mem:.0f} | {diff:.2e} |",
              flush=True)


def matmul_rate(size: int = 8192, reps: int = 20) -> float:
    """Measured bf16 dense matmul FLOP/s of this GPU (the MFU denominator)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def table_training(batch_size: int, history: int, steps: int) -> None:
    from mtfm.config import load_schema
    from mtfm.model import MTFM
    from mtfm.model.config import load_model_config
    from mtfm.model.flops import count_flops
    from mtfm.model.testing import BatchShape, random_batch

    schema = load_schema(resources.files("mtfm") / "configs" / "synthetic.yaml")
    shape = BatchShape(history=history, realtime=64, exposures=24, history_span=30 * 86_400_000,
                       realtime_lead=3_600_000)
    batches = [random_batch(schema, batch_size, seed=s, shape=shape).to("cuda") for s in range(steps + 2)]
    peak = matmul_rate()
    tokens = statistics.mean(b.num_tokens for b in batches)
    print(f"\n### c) Training step, paper preset, bf16 autocast, batch {batch_size} users, "
          f"{tokens:.0f} tokens/batch on average (bf16 matmul rate measured: {peak / 1e12:.0f} TFLOP/s)\n")
    print("| path | step ms | samples/s | tokens/s | model TFLOP/s | MFU | first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = {}
    for label, backend, disabled in (("before: jagged attention, PyTorch GLN", "jagged", "1"),
                                     ("after: Triton attention + fused GLN", "auto", "0")):
        os.environ["MTFM_DISABLE_TRITON"] = disabled
        config = load_model_config("paper").model_copy(update={"attention_backend": backend})
        torch.manual_seed(0)
        model = MTFM(schema, config).cuda().train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        flops = [count_flops(model, b)["train_estimate"] for b in batches]

        def step(batch) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(batch, model(batch))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        first = float(step(batches[0]))
        step(batches[1])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches[2:]:
            step(b)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        n = len(batches) - 2
        rate = sum(flops[2:]) / elapsed
        results[label] = elapsed
        print(f"| {label} | {1e3 * elapsed / n:.1f} | {batch_size * n / elapsed:.1f} | "
              f"{sum(b.num_tokens for b in batches[2:]) / elapsed:.0f} | {rate / 1e12:.1f} | {100 * rate / peak:.1f}% | "
              f"{first:.5f} |", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    os.environ.pop("MTFM_DISABLE_TRITON", None)
    before, after = results.values()
    print(f"\nTraining throughput after / before: {before / after:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["a", "b", "c"], default=None)
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--history", type=int, default=1000, help="max rows per history type and user (uniform)")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    import triton

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    sections = {
        "a": lambda: table_attention([int(x) for x in args.lengths.split(",")], args.reps),
        "b": lambda: table_gln([16_384, 65_536, 262_144, 1_048_576], args.reps),
        "c": lambda: table_training(args.batch_size, args.history, args.steps),
    }
    for name, fn in sections.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception:  # keep the other tables: one failure must not cost the whole GPU run
                traceback.print_exc()
            print(f"\n(section {name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
