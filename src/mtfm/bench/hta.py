"""HTA ablation with accuracy (paper section 4.3, Table 3): which ``(K:P)xB`` stack buys what.

Every configuration is the same model preset (default ``small``) with only the stack (and, for
the GQA pair, the key/value heads and the batch size) overridden, trained by the library's own
trainer (:func:`mtfm.train.trainer.train_from_data`) on one prepared synthetic world with the
same seeds and the same budget, then scored on the test split (:func:`mtfm.train.evaluate.evaluate_run`,
each scenario from its best valid snapshot). Why a world with long behaviour logs: target and
full attention differ only in what the H and R tokens do, so with a few dozen of them per user
the configurations could not differ; the default world here has hundreds of H + R tokens per
sample (``history_days`` 120, history cap 256 per type, real-time cap 64).

Configurations (:data:`DEFAULT_CONFIGS`) are written at the paper's 16 layers as
``(K:P)xB [kv=G|kv=H] [batch=M]``: ``kv=H`` is one key/value head per query head (no GQA),
``kv=1`` grouped-query attention with one key/value head; without ``kv`` the preset's count.
``batch=M`` trains with M times the batch size, as the paper's GQA pair does (2x); the budget
stays the same number of samples (``max_steps`` is divided by M; ``epochs`` are epochs).
Without it the paper's (3:1)x4 row and its "(3:1)x4 MTFM" row would be the same run here, since
the small preset already has one key/value head.

Depth scaling (``layers`` L instead of 16, for small runs): a one-block stack scales its layers,
``(0:16)x1 -> (0:L)x1`` and ``(16:0)x1 -> (L:0)x1``; a multi-block stack keeps its block shape and
gets ``max(1, round(B * L / 16))`` blocks (halves round up): at L = 4, ``(1:1)x8 -> (1:1)x2``,
``(3:1)x4 -> (3:1)x1``, ``(5:1)x3 -> (5:1)x1``. The paper's (5:1)x3 has 18 layers, not 16, and so
does its row here; the report's ``layers`` column gives every row's actual depth.

Measurements: test AUC / GAUC per scenario and task (mean over seeds); training throughput of
the timed training steps (the trainer's own windows: loader and steps, no evaluation), as
exposures/s and samples/s; peak memory as the peak resident set size (``ru_maxrss``) of a
fresh process that runs one training, and its rise over the RSS just before training starts.
Each run is a spawned process for that reason (and so runs cannot share state).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mtfm.dirlock import claim_output_dir, hold_dir_lock

REFERENCE_LAYERS = 16  # the depth of every configuration of paper Table 3 but (5:1)x3
DEFAULT_CONFIGS: tuple[str, ...] = (
    "(0:16)x1", "(16:0)x1", "(1:1)x8", "(3:1)x4", "(5:1)x3", "(3:1)x4 kv=H batch=2", "(3:1)x4 kv=1 batch=2",
)
MARKER = "hta_ablation.json"  # written into --out; an --overwrite replaces only a directory that holds it
REPORT = "hta_ablation.md"

_SPEC_RE = re.compile(r"^(\([^)]*\)\s*[xX]\s*\d+)((?:\s+\w+=\w+)*)\s*$")


@dataclass(frozen=True)
class AblationConfig:
    """One row of the ablation: a ``(K:P)xB`` stack, its key/value heads and its batch multiplier.

    ``kv``: an int, ``"H"`` (as many as the query heads: no GQA) or None (the preset's).
    """

    k: int
    p: int
    b: int
    kv: int | str | None = None
    batch: int = 1

    @property
    def hta(self) -> str:
        return f"({self.k}:{self.p})x{self.b}"

    @property
    def layers(self) -> int:
        return self.b * (self.k + self.p)

    @property
    def spec(self) -> str:
        """The text :func:`parse_config` reads back to this config."""
        opts = ([f"kv={self.kv}"] if self.kv is not None else []) + ([f"batch={self.batch}"] if self.batch != 1 else [])
        return " ".join([self.hta, *opts])

    @property
    def name(self) -> str:
        """What the row is, in the paper's words."""
        kind = "full attention only" if self.k == 0 else "target attention only" if self.p == 0 else "hybrid"
        gqa = {None: "", "H": ", w/o GQA"}.get(self.kv, ", GQA") if self.kv is not None else ""
        return f"{kind}{gqa}" + (f", batch {self.batch}x" if self.batch != 1 else "")

    @property
    def slug(self) -> str:
        """A directory name for the config's runs."""
        return re.sub(r"[^0-9A-Za-z]+", "_", self.spec).strip("_")


def parse_config(text: str) -> AblationConfig:
    """``"(3:1)x4 kv=H batch=2"`` -> :class:`AblationConfig`; a ValueError names what is wrong."""
    from mtfm.model.config import parse_hta

    m = _SPEC_RE.match(text.strip())
    if not m:
        raise ValueError(f"HTA ablation config {text!r}: expected '(K:P)xB [kv=G|kv=H] [batch=M]', e.g. '(3:1)x4 kv=H'")
    k, p, b = parse_hta(m.group(1))
    kv: int | str | None = None
    batch = 1
    for option in m.group(2).split():
        key, value = option.split("=", 1)
        if key == "kv":
            kv = "H" if value.upper() == "H" else _positive(value, text, "kv")
        elif key == "batch":
            batch = _positive(value, text, "batch")
        else:
            raise ValueError(f"HTA ablation config {text!r}: unknown option {key!r} (kv=G|H, batch=M)")
    return AblationConfig(k, p, b, kv, batch)


def _positive(value: str, text: str, key: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"HTA ablation config {text!r}: {key} must be a positive integer, got {value!r}")
    return int(value)


def scale_config(config: AblationConfig, layers: int, reference: int = REFERENCE_LAYERS) -> AblationConfig:
    """The config at ``layers`` instead of ``reference`` layers (see the module doc for the rule)."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    if layers == reference:
        return config
    factor = layers / reference
    if config.b == 1:
        k, p = math.floor(config.k * factor + 0.5), math.floor(config.p * factor + 0.5)
        if k + p == 0:
            k, p = (0, 1) if config.p else (1, 0)
        return AblationConfig(k, p, 1, config.kv, config.batch)
    blocks = max(1, math.floor(config.b * factor + 0.5))
    return AblationConfig(config.k, config.p, blocks, config.kv, config.batch)


def model_config_for(config: AblationConfig, base: dict) -> dict:
    """The model config (as a dict) of one row: ``base`` with the stack and key/value heads overridden."""
    from mtfm.model.config import model_config_from_dict

    heads = int(base.get("num_heads", 2))
    kv = base.get("num_kv_groups", 1) if config.kv is None else heads if config.kv == "H" else config.kv
    raw = {**base, "target_layers_per_block": config.k, "full_layers_per_block": config.p, "blocks": config.b,
           "num_kv_groups": kv}
    return model_config_from_dict(raw, f"HTA ablation config {config.spec}").model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Options, world, output directory
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldOptions:
    """The synthetic world the ablation prepares when it is not given ``data`` (long histories)."""

    users: int = 3000
    seed: int = 0
    days: int = 14
    history_days: int = 120
    history_max_len: int = 256
    realtime_max_len: int = 64


@dataclass
class AblationOptions:
    """Everything one ablation run needs (the CLI and benchmarks/hta_ablation.py fill it)."""

    out: Path
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    layers: int = REFERENCE_LAYERS
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 64
    model: str = "small"
    heads: int | None = None
    task: str = "ctr"
    threads: int = 1
    data: Path | None = None
    world: WorldOptions = field(default_factory=WorldOptions)
    overwrite: bool = False
    quiet: bool = False
    isolate: bool = True  # each run in a fresh process (False: in this one, faster, but no peak memory)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Free ``out`` for the ablation (:func:`mtfm.dirlock.claim_output_dir`: only an earlier
    ablation's output, holding :data:`MARKER`, is ever replaced)."""
    claim_output_dir(out, overwrite, MARKER, "mtfm bench hta")


def prepare_world(world: WorldOptions, data: Path, quiet: bool) -> None:
    """Generate and prepare the synthetic world into ``data`` (the lock of ``out`` covers it)."""
    from mtfm.data.aggregate import prepare
    from mtfm.data.sources.synthetic import load_source

    raw = load_source(None, None, world.users, world.seed, days=world.days, history_days=world.history_days,
                      history_max_len=world.history_max_len, realtime_max_len=world.realtime_max_len,
                      other_flags=f"--out {data}")
    prepare(raw, data, progress=not quiet)


def world_stats(data: Path) -> dict:
    """Samples, exposures and tokens per sample of the train split (H + R tokens are what attention
    spends its time on; every exposure is one T-token)."""
    from mtfm.data.loader import BatchLoader

    loader = BatchLoader(data, "train", 256, shuffle=False, seed=0, prefetch=0)
    samples = tokens = exposures = 0
    for batch in loader.iterate(0):
        samples, tokens, exposures = samples + batch.batch_size, tokens + batch.num_tokens, exposures + batch.num_exposures
    return {"train_samples": samples, "train_exposures": exposures, "tokens_per_sample": tokens / samples,
            "hr_tokens_per_sample": (tokens - exposures) / samples, "exposures_per_sample": exposures / samples}


# ---------------------------------------------------------------------------------------------
# One run (in its own process)
# ---------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    """The resident set size now (Linux /proc; elsewhere the peak so far, the best there is)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _samples_seen(steps: int, epochs_completed: int, per_epoch: int, batch_size: int) -> int:
    """Samples of ``steps`` training steps: whole epochs, then full batches of the unfinished one."""
    batches = math.ceil(per_epoch / batch_size)
    rest = steps - epochs_completed * batches
    return epochs_completed * per_epoch + min(rest * batch_size, per_epoch)


def train_and_evaluate(job: dict) -> dict:
    """Train one (config, seed) with the library's trainer, then score it on the test split.

    In a fresh process (``job["isolated"]``, see the module doc) ``ru_maxrss`` is this training's
    peak; in a shared one it is not, and the peak is left out (None)."""
    import torch

    from mtfm.train.checkpoint import write_json
    from mtfm.train.config import TrainConfig, load_train_config
    from mtfm.train.evaluate import evaluate_run
    from mtfm.train.trainer import train_from_data

    torch.set_num_threads(job["threads"])
    settings = {"epochs": job["epochs"], "max_steps": job["max_steps"], "batch_size": job["batch_size"],
                "seed": job["seed"], "threads": job["threads"], "progress": False}
    cfg = TrainConfig(**{**load_train_config("mtfm").model_dump(), **settings})
    run = Path(job["run"])
    rss_before = _rss_mib()
    result = train_from_data(job["data"], run, arch="mtfm", model_config=job["model"], cfg=cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if job["isolated"] else None  # KiB on Linux
    t0 = time.perf_counter()
    metrics, _ = evaluate_run(run, job["data"], "test")
    write_json(run / "eval_test.json", metrics)
    tp, m = result.metrics["throughput"], result.metrics
    samples = _samples_seen(m["steps"], m["epochs_completed"], m["data"]["train_samples"], job["batch_size"])
    seconds = tp["train_seconds"]
    return {"config": job["config"], "seed": job["seed"], "test": metrics, "steps": m["steps"],
            "epochs_completed": m["epochs_completed"], "train_seconds": seconds, "samples": samples,
            "samples_per_s": samples / seconds if seconds else None, "exposures_per_s": tp["exposures_per_s"],
            "tokens_per_s": tp["tokens_per_s"], "peak_rss_mib": peak, "rss_before_train_mib": rss_before,
            "eval_seconds": time.perf_counter() - t0}


def _jobs(opts: AblationOptions, configs: list[AblationConfig], base: dict, data: Path) -> list[dict]:
    jobs = []
    for config in configs:
        steps = None if opts.max_steps is None else max(1, math.floor(opts.max_steps / config.batch + 0.5))
        for seed in opts.seeds:
            jobs.append({"config": config.spec, "seed": seed, "model": model_config_for(config, base),
                         "data": str(data), "run": str(opts.out / "runs" / config.slug / f"seed{seed}"),
                         "epochs": opts.epochs, "max_steps": steps, "batch_size": opts.batch_size * config.batch,
                         "threads": opts.threads, "isolated": opts.isolate})
    return jobs


def _run_jobs(jobs: list[dict], quiet: bool) -> list[dict]:
    """The jobs one after the other (one core, fair timings), each in a fresh spawned process when
    the job says ``isolated`` (spawned, not forked: the parent has run polars' and torch's threads)."""
    results = []
    context = multiprocessing.get_context("spawn")
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        if job["isolated"]:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results.append(pool.submit(train_and_evaluate, job).result())
        else:
            results.append(train_and_evaluate(job))
        if not quiet:
            r = results[-1]
            print(f"[{i + 1}/{len(jobs)}] {job['config']} seed {job['seed']}: {time.perf_counter() - t0:.0f} s "
                  f"({r['samples_per_s']:.1f} samples/s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# The whole ablation and its report
# ---------------------------------------------------------------------------------------------


def resolve_configs(opts: AblationOptions) -> list[AblationConfig]:
    """The parsed configs at the requested depth (duplicates after scaling refused: they would be one run)."""
    configs = [scale_config(parse_config(text), opts.layers) for text in opts.configs]
    specs = [c.spec for c in configs]
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ValueError(f"HTA ablation: configs {twice} appear twice at {opts.layers} layers; drop one")
    return configs


def base_model(opts: AblationOptions) -> dict:
    """The preset (or file) every row overrides, with ``heads`` query heads when given."""
    from mtfm.model.config import load_model_config, model_config_from_dict

    base = load_model_config(opts.model).model_dump(mode="json")
    if opts.heads is not None:
        base = model_config_from_dict({**base, "num_heads": opts.heads}, f"--heads {opts.heads}").model_dump(mode="json")
    return base


def run_ablation(opts: AblationOptions) -> tuple[str, dict]:
    """Prepare (or read) the world, train and score every config and seed, write the report and the
    JSON into ``opts.out``; return both. ``opts.out`` is locked for the whole run."""
    configs = resolve_configs(opts)
    base = base_model(opts)
    if not opts.seeds:
        raise ValueError("HTA ablation: give at least one seed")
    out = Path(opts.out).resolve()
    opts.out = out
    with hold_dir_lock(out, "mtfm bench hta"):
        check_out_dir(out, opts.overwrite)
        out.mkdir(parents=True)
        (out / MARKER).write_text(json.dumps({"status": "running", "options": _options_json(opts)}, indent=2))
        data = Path(opts.data).resolve() if opts.data is not None else out / "data"
        t0 = time.perf_counter()
        if opts.data is None:
            prepare_world(opts.world, data, opts.quiet)
        world = world_stats(data)
        world["prepare_seconds"] = time.perf_counter() - t0
        runs = _run_jobs(_jobs(opts, configs, base, data), opts.quiet)
        report, summary = format_report(configs, runs, opts, world, base)
        result = {"status": "done", "options": _options_json(opts), "world": world, "base_model": base,
                  "configs": [{**asdict(c), "spec": c.spec, "hta": c.hta, "layers": c.layers, "name": c.name}
                              for c in configs],
                  "summary": summary, "runs": runs}
        (out / REPORT).write_text(report + "\n")
        (out / MARKER).write_text(json.dumps(result, indent=2))
    return report, result


def _options_json(opts: AblationOptions) -> dict:
    raw = asdict(opts)
    return json.loads(json.dumps(raw, default=str))


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _row_summary(config: AblationConfig, runs: list[dict], scenarios: list[str], task: str, kv: int) -> dict:
    """Means over seeds of one config's runs (GAUC over scenarios: the unweighted mean of the scenarios')."""
    def metric(run: dict, s: str, name: str) -> float | None:
        return run["test"].get(s, {}).get(task, {}).get(name)

    per_seed_mean = [_mean([metric(r, s, "gauc") for s in scenarios]) for r in runs]
    return {
        "spec": config.spec, "name": config.name, "hta": config.hta, "layers": config.layers, "kv_groups": kv,
        "batch": config.batch, "seeds": [r["seed"] for r in runs],
        "auc": {s: _mean([metric(r, s, "auc") for r in runs]) for s in scenarios},
        "gauc": {s: _mean([metric(r, s, "gauc") for r in runs]) for s in scenarios},
        "mean_gauc_per_seed": per_seed_mean, "mean_gauc": _mean(per_seed_mean),
        "mean_gauc_std": float(np.std([x for x in per_seed_mean if x is not None], ddof=1))
        if sum(x is not None for x in per_seed_mean) > 1 else None,
        "exposures_per_s": _mean([r["exposures_per_s"] for r in runs]),
        "samples_per_s": _mean([r["samples_per_s"] for r in runs]),
        "peak_rss_mib": _peak([r["peak_rss_mib"] for r in runs]),
        "rss_rise_mib": _peak([None if r["peak_rss_mib"] is None else r["peak_rss_mib"] - r["rss_before_train_mib"]
                               for r in runs]),
        "train_seconds": _mean([r["train_seconds"] for r in runs]),
    }


def _peak(values: list[float | None]) -> float | None:
    """The largest of the seeds' figures (None when runs shared a process and have none)."""
    v = [x for x in values if x is not None]
    return max(v) if v else None


def _cell(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(configs: list[AblationConfig], runs: list[dict], opts: AblationOptions, world: dict,
                  base: dict) -> tuple[str, list[dict]]:
    """The Markdown table (one row per config) and the summary rows behind it."""
    scenarios = list(runs[0]["test"])
    rows = []
    for c in configs:
        kv = model_config_for(c, base)["num_kv_groups"]
        rows.append(_row_summary(c, [r for r in runs if r["config"] == c.spec], scenarios, opts.task, kv))
    full = next((r for r in rows if r["hta"].startswith("(0:") and r["batch"] == 1), None)
    for r in rows:
        both = full is not None and r["mean_gauc"] is not None and full["mean_gauc"] is not None
        r["delta_gauc_pp"] = 100 * (r["mean_gauc"] - full["mean_gauc"]) if both else None
        fast = full is not None and r["samples_per_s"] and full["samples_per_s"]
        r["speedup_vs_full"] = r["samples_per_s"] / full["samples_per_s"] if fast else None
    budget = f"{opts.epochs} epoch(s)" + (f", at most {opts.max_steps} steps of {opts.batch_size} samples "
                                          "(the same samples for a larger batch)" if opts.max_steps else "")
    lines = [
        f"HTA ablation (paper Table 3) at {opts.layers} layers on model `{opts.model}` (d_model {base['d_model']}, "
        f"{base['num_heads']} query heads); task `{opts.task}`, test split, mean over seeds {opts.seeds}; budget "
        f"{budget}, batch {opts.batch_size}; {opts.threads} torch thread(s).",
        f"World: {world['train_samples']:,} train samples, {world['exposures_per_sample']:.1f} exposures and "
        f"{world['tokens_per_sample']:.0f} tokens per sample ({world['hr_tokens_per_sample']:.0f} H + R tokens).",
        "Throughput: the trainer's timed training steps (loader included, evaluation excluded). Memory: peak RSS "
        "of the run's own process (ru_maxrss), and its rise over the RSS just before training"
        + ("." if opts.isolate else " (not measured: the runs shared one process, --in-process)."),
        "",
        "| config | HTA | layers | kv groups | batch | " + " | ".join(f"{s} AUC / GAUC" for s in scenarios)
        + " | mean GAUC | Δ GAUC vs full (pp) | exposures/s | samples/s | speed-up vs full | peak RSS (MiB) "
          "| RSS rise (MiB) |",
        "|---|---|---|---|---|" + "---|" * len(scenarios) + "---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{_cell(r['auc'][s], '.4f')} / {_cell(r['gauc'][s], '.4f')}" for s in scenarios]
        std = "" if r["mean_gauc_std"] is None else f" ± {r['mean_gauc_std']:.4f}"
        lines.append(
            f"| {r['name']} | {r['hta']} | {r['layers']} | {r['kv_groups']} | {r['batch']}x | " + " | ".join(cells)
            + f" | {_cell(r['mean_gauc'], '.4f')}{std} | {_cell(r['delta_gauc_pp'], '+.2f')} | "
              f"{_cell(r['exposures_per_s'], ',.0f')} | {_cell(r['samples_per_s'], ',.1f')} | "
              f"{_cell(r['speedup_vs_full'], '.2f')}{'x' if r['speedup_vs_full'] else ''} | "
              f"{_cell(r['peak_rss_mib'], ',.0f')} | {_cell(r['rss_rise_mib'], ',.0f')} |")
    return "\n".join(lines), rows
