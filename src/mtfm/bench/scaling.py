"""Scaling study (paper section 4.4, Figure 4): GAUC against model size and against training data.

What runs, on one prepared synthetic world (the same data, seed and budget for every model):

* **Model size** (Figure 4a): MTFM at several widths of its dense part (``d_model`` W, tokenizer
  hidden 2W, MMoE-head experts 2W -> W; the embedding tables stay as in the preset, as in
  scaling-law work the axis is the dense compute), and MMoE (the paper's comparison) at matched
  inference FLOPs per exposure. MTFM's FLOPs are :func:`mtfm.model.flops.count_flops` (the
  work its mask requires); MMoE's are counted by torch's ``FlopCounterMode``
  (:func:`~mtfm.model.flops.measured_forward_flops`), since it has no analytic count; its expert
  width is searched so the two agree within a few percent (:func:`match_mmoe`).
* **Data volume** (Figure 4b): the paper follows one model through continual training and reads
  the smallest scenario's GAUC against training tokens seen. Here every MTFM run makes one pass
  over the shuffled train split with a constant learning rate and checkpoints ``curve_points``
  times along it; the checkpoint after ``k`` steps is exactly a model trained for one pass on
  a random ``k / steps`` share of the data, so one run gives the whole curve (nested subsets of
  the data, without retraining). Tokens seen are counted exactly by replaying the loader's
  shuffled order. Each checkpoint is scored on the test split of the curve scenario (by default
  the one with the fewest training exposures, SQS in the synthetic world).

Uncertainty: one training seed per model (the budget of a 2-core machine); every GAUC's test-set
noise is estimated by a user-level bootstrap, paired across models (the same resampled users
score every model, :mod:`mtfm.bench.scaling_report`), which gives each fitted slope its spread.
Training-seed noise is not in it.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mtfm.dirlock import claim_output_dir, hold_dir_lock

MARKER = "scaling.json"  # written into --out; an --overwrite replaces only a directory that holds it
REPORT = "scaling.md"
DEFAULT_WIDTHS: tuple[int, ...] = (32, 48, 80, 128)  # ~0.5 to ~4.6 MFLOPs per exposure (9.5x) in the default world
PROBE_BATCHES = 8  # train batches (in file order) over which FLOPs per exposure are averaged


@dataclass
class ScalingWorld:
    """The synthetic world prepared when no ``data`` is given: SQS at a larger share than the default
    8,7,1 and two test days, so the smallest scenario's CTCVR GAUC is read over a few hundred
    positives rather than a few dozen (a curve of noise otherwise)."""

    users: int = 16000
    seed: int = 0
    days: int = 14
    valid_days: int = 1
    test_days: int = 2
    scenario_shares: tuple[float, ...] = (8.0, 7.0, 4.0)


@dataclass
class ScalingOptions:
    """Everything one study needs (the CLI and ``benchmarks/scaling.py`` fill it)."""

    out: Path
    widths: list[int] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    mmoe: bool = True
    curve_points: int = 8
    curve_scenario: str | None = None  # None: the scenario with the fewest training exposures
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    seed: int = 0
    model: str = "small"
    threads: int = 1
    workers: int = 1
    bootstrap: int = 200
    data: Path | None = None
    world: ScalingWorld = field(default_factory=ScalingWorld)
    overwrite: bool = False
    quiet: bool = False


# ---------------------------------------------------------------------------------------------
# Model sizes
# ---------------------------------------------------------------------------------------------


def mtfm_size(base: dict, width: int) -> dict:
    """The preset ``base`` with its dense widths scaled to ``width`` (heads, stack and embeddings kept)."""
    from mtfm.model.config import model_config_from_dict

    heads = int(base.get("num_heads", 2))
    if width < heads or width % heads:
        raise ValueError(f"scaling width {width}: must be a positive multiple of the preset's {heads} heads")
    raw = {**base, "d_model": width, "head_dim": None, "tokenizer_hidden": [2 * width],
           "mmoe_expert_hidden": [2 * width], "mmoe_expert_dim": width,
           "mmoe_tower_hidden": [max(16, width // 2)]}
    return model_config_from_dict(raw, f"scaling width {width}").model_dump(mode="json")


def mmoe_size(hidden: int) -> dict:
    """MMoE's config at expert hidden width ``hidden`` (expert output hidden/2, towers hidden/4)."""
    return {"expert_hidden": [hidden], "expert_dim": max(8, hidden // 2), "tower_hidden": [max(8, hidden // 4)]}


def flops_per_exposure(arch: str, model_config: dict, schema, batches: list) -> float:
    """Inference FLOPs per exposure of one model over ``batches`` (see the module doc for the counters)."""
    from mtfm.model.flops import count_flops, measured_forward_flops
    from mtfm.train.models import build_model

    model = build_model(arch, model_config, schema)
    exposures = sum(b.num_exposures for b in batches)
    if arch == "mtfm":
        total = sum(count_flops(model, b)["total"] for b in batches)
    else:
        total = measured_forward_flops(model, batches)
    return total / exposures


def match_mmoe(target: float, schema, batches: list, step: int = 8) -> tuple[dict, float]:
    """The MMoE config (a multiple of ``step`` as expert width) whose FLOPs per exposure are nearest
    ``target`` in ratio; bisection, since the count grows with the width."""
    lo, hi = 1, 512  # in units of step: widths 8 .. 4096
    cache: dict[int, float] = {}

    def flops(units: int) -> float:
        if units not in cache:
            cache[units] = flops_per_exposure("mmoe", mmoe_size(units * step), schema, batches)
        return cache[units]

    if flops(hi) < target:
        raise ValueError(f"MMoE cannot reach {target:.3g} FLOPs per exposure below expert width {hi * step}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if flops(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda u: abs(math.log(flops(u) / target)))
    return mmoe_size(best * step), flops(best)


# ---------------------------------------------------------------------------------------------
# Output directory and world
# ---------------------------------------------------------------------------------------------


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Free ``out`` for the study (:func:`mtfm.dirlock.claim_output_dir`: only an earlier study's
    output, holding :data:`MARKER`, is ever replaced)."""
    claim_output_dir(out, overwrite, MARKER, "mtfm bench scaling")


def prepare_world(world: ScalingWorld, data: Path, quiet: bool) -> None:
    """Generate and prepare the synthetic world into ``data``."""
    from mtfm.data.aggregate import prepare
    from mtfm.data.sources.synthetic import load_source

    raw = load_source(None, None, world.users, world.seed, days=world.days, valid_days=world.valid_days,
                      test_days=world.test_days, num_scenarios=len(world.scenario_shares),
                      scenario_shares=tuple(world.scenario_shares), other_flags=f"--out {data}")
    prepare(raw, data, progress=not quiet)


def smallest_scenario(data: Path) -> str:
    """The scenario with the fewest training exposures (the paper reads Figure 4b on SQS, its smallest)."""
    from mtfm.train.checkpoint import read_json

    counts = read_json(data / "manifest.json")["splits"]["train"]["scenario_exposures"]
    return min(counts, key=counts.get)


# ---------------------------------------------------------------------------------------------
# One run (in its own process)
# ---------------------------------------------------------------------------------------------


def _score(ckpt: Path, data: str, names: list[str], out: Path) -> dict:
    """Score ``names`` of the test split with checkpoint ``ckpt``; keep the predictions (for the
    bootstrap) in ``out`` (.npz) and return the metrics."""
    import torch

    from mtfm.train.evaluate import checkpoint_loader, compute_metrics, predict
    from mtfm.train.models import model_from_checkpoint

    model, _, _ = model_from_checkpoint(ckpt)
    loader = checkpoint_loader(ckpt, data, "test", names, 256)
    tasks = {s.name: s.task_names for s in loader.schema.scenarios}
    preds = predict(model, loader.iterate(0), torch.device("cpu"), tasks)
    arrays = {}
    for s, p in preds.items():
        arrays.update({f"{s}/users": p.users, f"{s}/labels": p.labels, f"{s}/mask": p.mask, f"{s}/probs": p.probs})
    np.savez_compressed(out, **arrays)
    return compute_metrics(preds, tasks)


def _tokens_by_step(data: str, batch_size: int, seed: int, epochs: int, steps: int) -> list[int]:
    """Training tokens seen after each step (index ``k``: after ``k`` steps), replaying the trainer's
    shuffled order (the loader is deterministic for its seed)."""
    from mtfm.data.loader import BatchLoader

    loader = BatchLoader(data, "train", batch_size, shuffle=True, seed=seed, prefetch=0)
    seen = [0]
    for epoch in range(epochs):
        for batch in loader.iterate(epoch):
            if len(seen) > steps:
                return seen
            seen.append(seen[-1] + batch.num_tokens)
    return seen


def run_job(job: dict) -> dict:
    """Train one model, score its last checkpoint on every scenario and (``job["curve"]``) every
    checkpoint along training on the curve scenario."""
    import torch

    from mtfm.train.checkpoint import read_json, write_json
    from mtfm.train.config import TrainConfig, load_train_config
    from mtfm.train.trainer import train_from_data

    torch.set_num_threads(job["threads"])
    settings = {"epochs": job["epochs"], "max_steps": job["max_steps"], "batch_size": job["batch_size"],
                "seed": job["seed"], "threads": job["threads"], "progress": False, "patience": None,
                "checkpoint_every": job["checkpoint_every"], "keep_checkpoints": 10_000}
    cfg = TrainConfig(**{**load_train_config(job["arch"]).model_dump(), **settings})
    run = Path(job["run"])
    t0 = time.perf_counter()
    result = train_from_data(job["data"], run, arch=job["arch"], model_config=job["model"], cfg=cfg)
    train_wall = time.perf_counter() - t0
    steps = result.metrics["steps"]
    checkpoints = sorted(p for p in (run / "checkpoints").glob("step-*") if p.is_dir())
    scenarios = [s["name"] for s in read_json(checkpoints[-1] / "config.json")["schema"]["scenarios"]]
    final = _score(checkpoints[-1], job["data"], scenarios, run / "preds_final.npz")
    write_json(run / "eval_test.json", final)
    curve = []
    if job["curve"]:
        tokens = _tokens_by_step(job["data"], job["batch_size"], job["seed"], job["epochs"], steps)
        for ckpt in checkpoints:
            step = int(ckpt.name.split("-")[1])
            metrics = _score(ckpt, job["data"], [job["curve_scenario"]], run / f"preds_{ckpt.name}.npz")
            curve.append({"step": step, "tokens": tokens[min(step, len(tokens) - 1)], "checkpoint": ckpt.name,
                          "test": metrics})
    tp = result.metrics["throughput"]
    return {"name": job["name"], "arch": job["arch"], "width": job["width"], "run": job["run"], "model": job["model"],
            "flops_per_exposure": job["flops_per_exposure"], "parameters": job["parameters"], "steps": steps,
            "train_seconds": tp["train_seconds"], "train_wall_seconds": train_wall,
            "exposures_per_s": tp["exposures_per_s"], "test": final, "curve": curve,
            "eval_seconds": time.perf_counter() - t0 - train_wall}


def _run_jobs(jobs: list[dict], workers: int, quiet: bool) -> list[dict]:
    """Each job in a fresh spawned process (``workers`` at a time), results in job order."""
    context = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, job) for job in jobs]
        results = []
        for i, future in enumerate(futures):
            results.append(future.result())
            if not quiet:
                r = results[-1]
                print(f"[{i + 1}/{len(jobs)}] {r['name']}: trained {r['train_wall_seconds']:.0f} s, scored "
                      f"{r['eval_seconds']:.0f} s ({time.perf_counter() - t0:.0f} s since start)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# The whole study
# ---------------------------------------------------------------------------------------------


def plan_jobs(opts: ScalingOptions, data: Path, quiet: bool = True) -> tuple[list[dict], dict]:
    """One job per MTFM width and (``mmoe``) one MMoE at each width's FLOPs; also the world facts."""
    from mtfm.data.loader import BatchLoader
    from mtfm.model.config import load_model_config
    from mtfm.model.flops import count_parameters
    from mtfm.train.models import build_model

    if not opts.widths or len(set(opts.widths)) != len(opts.widths):
        raise ValueError(f"scaling widths must be distinct and at least one, got {opts.widths}")
    if opts.curve_points < 1:
        raise ValueError(f"curve_points must be at least 1, got {opts.curve_points}")
    probe = BatchLoader(data, "train", opts.batch_size, shuffle=False, seed=0, prefetch=0)
    schema, per_epoch = probe.schema, probe.num_batches(0)
    batches = [b for _, b in zip(range(PROBE_BATCHES), probe.iterate(0))]
    curve_scenario = opts.curve_scenario or smallest_scenario(data)
    if curve_scenario not in schema.scenario_names:
        raise ValueError(f"curve scenario {curve_scenario!r} is not in {data}'s schema {schema.scenario_names}")
    steps = per_epoch * opts.epochs if opts.max_steps is None else min(opts.max_steps, per_epoch * opts.epochs)
    every = max(1, math.ceil(steps / opts.curve_points))
    base = load_model_config(opts.model).model_dump(mode="json")
    common = {"data": str(data), "epochs": opts.epochs, "max_steps": opts.max_steps, "batch_size": opts.batch_size,
              "seed": opts.seed, "threads": opts.threads, "checkpoint_every": every, "curve_scenario": curve_scenario}
    jobs = []
    for width in sorted(opts.widths):
        model = mtfm_size(base, width)
        flops = flops_per_exposure("mtfm", model, schema, batches)
        params = count_parameters(build_model("mtfm", model, schema))
        jobs.append({**common, "name": f"mtfm-w{width}", "arch": "mtfm", "width": width, "model": model,
                     "flops_per_exposure": flops, "parameters": {"dense": params["dense"], "total": params["total"]},
                     "run": str(opts.out / "runs" / f"mtfm-w{width}"), "curve": True})
        if opts.mmoe:
            mmoe, mmoe_flops = match_mmoe(flops, schema, batches)
            total = sum(p.numel() for p in build_model("mmoe", mmoe, schema).parameters())
            jobs.append({**common, "name": f"mmoe-at-w{width}", "arch": "mmoe", "width": width, "model": mmoe,
                         "flops_per_exposure": mmoe_flops, "parameters": {"total": total},
                         "run": str(opts.out / "runs" / f"mmoe-at-w{width}"), "curve": False,
                         "checkpoint_every": None})  # no curve: only its last checkpoint is scored
            if not quiet:
                print(f"width {width}: MTFM {flops / 1e6:.3f} MFLOPs/exposure, MMoE expert width "
                      f"{mmoe['expert_hidden'][0]}: {mmoe_flops / 1e6:.3f}", flush=True)
    world = {"steps_per_epoch": per_epoch, "checkpoint_every": every, "curve_scenario": curve_scenario,
             "scenarios": schema.scenario_names}
    return jobs, world


def run_study(opts: ScalingOptions) -> tuple[str, dict]:
    """Prepare (or reuse) the world, train and score every job, write the report, JSON, CSVs and plots."""
    from mtfm.bench.scaling_report import summarise, write_outputs
    from mtfm.train.checkpoint import write_json

    opts.out = Path(opts.out).resolve()
    with hold_dir_lock(opts.out, "mtfm bench scaling"):
        check_out_dir(opts.out, opts.overwrite)
        opts.out.mkdir(parents=True)
        write_json(opts.out / MARKER, {"status": "running", "options": _options_json(opts)})
        data = Path(opts.data).resolve() if opts.data is not None else opts.out / "data"
        if opts.data is None:
            prepare_world(opts.world, data, opts.quiet)
        jobs, world = plan_jobs(opts, data, opts.quiet)
        results = _run_jobs(jobs, opts.workers, opts.quiet)
        summary = summarise(results, world, opts.bootstrap, seed=opts.seed)
        summary["options"] = _options_json(opts)
        report = write_outputs(summary, results, opts.out)
    return report, summary


def _options_json(opts: ScalingOptions) -> dict:
    raw = asdict(opts)
    raw["out"], raw["data"] = str(opts.out), str(opts.data) if opts.data else None
    return raw
