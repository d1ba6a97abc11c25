"""Latency of one scenario's exported artifact against eager PyTorch, side by side in one run.

One request is one user with the schema's full sequences (every history and real-time type at
its ``max_len``) and N candidates of one scenario (random features, ``mtfm.model.testing``),
scored by the scenario subgraph of a randomly initialised model of the preset (latency does not
depend on training) in five ways:

* ``eager forward``: ``subgraph(batch)``, the model's own forward (the ``auto`` backend: jagged on CPU);
* ``eager request``: ``subgraph.forward_request(batch)`` (the graph that is exported, run eagerly);
* ``program``: the ``torch.export`` program's module (``program.pt2``);
* ``aoti``: the AOTInductor package (``aoti.pt2``);
* ``onnx``: the ONNX model on ONNX Runtime (``model.onnx``).

The artifact rows time the graph call on prepared inputs; ``host prep`` is what
:meth:`mtfm.serve.artifact.ExportedScenario.logits` adds before it (value checks, padding,
flattening). Times: best of ``--repeats`` after a warm-up, ms, fp32, eval, ``--threads`` threads.
Every runtime's logits are compared with the eager forward (max abs difference).

    python benchmarks/bench_export.py --model small --sizes 16 128 1024 4096
    python benchmarks/bench_export.py --model paper --sizes 16 128 1024 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench_falcon import _best_ms  # the same timing rule as the M-Falcon table (benchmarks/ is the script dir)

from mtfm.data.sources.synthetic import load_packaged_schema
from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch
from mtfm.model.config import load_model_config
from mtfm.model.testing import BatchShape, random_batch
from mtfm.serve.artifact import ExportedScenario, write_artifact
from mtfm.serve.export import pad_request, request_inputs

RUNTIMES = ("program", "aoti", "onnx")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--scenario", default="HP")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1024, 4096])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    schema = load_packaged_schema()
    torch.manual_seed(0)
    model = MTFM(schema, load_model_config(args.model)).eval()
    sub = model.scenario_subgraph(args.scenario)
    out = Path(tempfile.mkdtemp(prefix="bench_export_")) / args.scenario
    meta = write_artifact(out, sub, None, {"benchmark": "bench_export.py", "model": args.model},
                          aoti="aoti" in args.runtimes, onnx="onnx" in args.runtimes)
    artifacts = {r: ExportedScenario.load(out, r) for r in args.runtimes}
    lengths = {s.name: [s.max_len] for s in (*schema.history, *schema.realtime)}
    context = sum(v[0] for v in lengths.values())
    print(f"model {args.model} ({model.config.hta}, d_model {model.config.d_model}), scenario {args.scenario}, "
          f"{args.threads} thread(s), {context} context tokens per request; subgraph {meta['parameters']:,} of "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; export {meta['export_seconds']} s"
          + (f", AOTInductor compile {meta['aoti_compile_seconds']} s" if "aoti_compile_seconds" in meta else "")
          + (f", ONNX export {meta['onnx_export_seconds']} s" if "onnx_export_seconds" in meta else "") + "\n")
    head = ["N", "eager forward ms", "eager request ms", *(f"{r} ms" for r in args.runtimes), "host prep ms",
            *(f"{r} vs eager" for r in args.runtimes), "max abs logit diff"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for n in args.sizes:
        batch = restrict_batch(random_batch(schema, 1, seed=n, shape=BatchShape(exposures=n),
                                            lengths={**lengths, args.scenario: [n]}), [args.scenario])
        spec = artifacts[args.runtimes[0]].spec
        inputs = request_inputs(spec, pad_request(batch, spec))
        with torch.no_grad():
            want = sub(batch).logits[args.scenario]
            row = {"N": n, "eager_forward_ms": _best_ms(lambda: sub(batch), args.repeats),
                   "eager_request_ms": _best_ms(lambda: sub.forward_request(batch), args.repeats)}
        diff = 0.0
        for r, artifact in artifacts.items():
            row[f"{r}_ms"] = _best_ms(lambda: artifact.run(inputs), args.repeats)
            diff = max(diff, float((artifact.logits(batch) - want).abs().max()))
        row["host_prep_ms"] = _best_ms(lambda: request_inputs(spec, pad_request(batch, spec)), args.repeats)
        row["max_abs_logit_diff"] = diff
        rows.append(row)
        cells = [str(n), f"{row['eager_forward_ms']:.1f}", f"{row['eager_request_ms']:.1f}",
                 *(f"{row[f'{r}_ms']:.1f}" for r in args.runtimes), f"{row['host_prep_ms']:.1f}",
                 *(f"{row['eager_forward_ms'] / row[f'{r}_ms']:.2f}x" for r in args.runtimes), f"{diff:.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "meta": {
            k: v for k, v in meta.items() if k not in ("inputs", "schema")}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
