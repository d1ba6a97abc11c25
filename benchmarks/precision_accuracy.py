"""AUC / GAUC deltas of bf16 inference and 2:4-pruned attention projections against fp32 (issue 12 item 6).

Scores one split of a trained run four ways -- fp32 (reference), bf16 autocast, 2:4-pruned
attention projections with dense fp32 math (:func:`mtfm.serve.sparsity.prune_2_4`), and pruned
under bf16 -- each scenario from its own best checkpoint as ``mtfm evaluate`` does, and prints
per scenario/task the reference AUC/GAUC and each variant's delta, plus the achieved sparsity.
CPU only; no fine-tuning after pruning (the paper's sparse model is pruned then served).

    .venv/bin/python benchmarks/precision_accuracy.py --run RUN --data DIR [--split test] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtfm.serve.sparsity import prune_2_4
from mtfm.train.evaluate import checkpoint_loader, compute_metrics, predict, scenario_checkpoints
from mtfm.train.models import model_from_checkpoint

VARIANTS = ("fp32", "bf16", "pruned_fp32", "pruned_bf16")


def score_variants(run: str, data: str, split: str, batch_size: int) -> tuple[dict, dict[str, float]]:
    """``{variant: {scenario: {task: metrics}}}`` and each checkpoint's achieved sparsity."""
    chosen = scenario_checkpoints(run, "best")
    groups: dict[Path, list[str]] = {}
    for scenario, ckpt in chosen.items():
        groups.setdefault(ckpt, []).append(scenario)
    results: dict[str, dict] = {v: {} for v in VARIANTS}
    sparsity: dict[str, float] = {}
    cpu = torch.device("cpu")
    for ckpt, names in groups.items():
        model, _, _ = model_from_checkpoint(ckpt)
        pruned, report = prune_2_4(model)
        sparsity[ckpt.name] = report.sparsity
        loader = checkpoint_loader(ckpt, data, split, names, batch_size)
        tasks = {s.name: s.task_names for s in loader.schema.scenarios}
        for variant in VARIANTS:
            m = pruned if variant.startswith("pruned") else model
            preds = predict(m, loader.iterate(0), cpu, tasks, bf16=variant.endswith("bf16"))
            results[variant].update(compute_metrics(preds, tasks))
    return results, sparsity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results, sparsity = score_variants(args.run, args.data, args.split, args.batch_size)
    print(f"{args.split} split of {args.data}, run {args.run} ({time.perf_counter() - t0:.0f} s)")
    print("achieved sparsity of the pruned projections: " + ", ".join(f"{k} {v:.3f}" for k, v in sparsity.items()))
    print("| scenario | task | fp32 AUC | fp32 GAUC | " + " | ".join(f"{v} dAUC | {v} dGAUC" for v in VARIANTS[1:]) + " |")
    print("|---|---|---:|---:|" + "---:|---:|" * (len(VARIANTS) - 1))
    ref = results["fp32"]
    for scenario, tasks in ref.items():
        for task, m in tasks.items():
            cells = [f"{m['auc']:.4f}", f"{m['gauc']:.4f}"]
            for v in VARIANTS[1:]:
                o = results[v][scenario][task]
                cells += [f"{o['auc'] - m['auc']:+.4f}", f"{o['gauc'] - m['gauc']:+.4f}"]
            print(f"| {scenario} | {task} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"metrics": results, "sparsity": sparsity}, indent=1))


if __name__ == "__main__":
    main()
