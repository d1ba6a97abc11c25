"""Train and test every model of a comparison the same way (see :mod:`mtfm.compare`).

Fairness rules, enforced here rather than left to whoever runs the comparison:

* **same data**: one prepared directory; train split to fit, valid split to stop early and to
  choose the lr, test split only to report;
* **same budget**: the same ``epochs`` and ``patience`` (early stopping on the valid split's
  user-weighted mean GAUC, :func:`mtfm.train.evaluate.mean_gauc`) and batch size for every neural
  model; LightGBM stops on its own valid logloss within its round limit;
* **same tuning effort**: each model's preset learning rate (``configs/train_<arch>.yaml``;
  LightGBM's ``learning_rate``) times every factor of ``lr_factors``, trained with the first
  seed; the lr with the best valid mean GAUC is then trained with every seed. Nothing else is
  tuned for any model, MTFM included.

Each run lives in ``OUT/runs/<model>/lr<lr>-seed<seed>/`` with a ``result.json`` written last,
so an interrupted comparison continues where it stopped (a run with ``result.json`` is reused,
after checking it was made with the same settings).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from mtfm.train.evaluate import Metrics

GBDT = "lightgbm"
NEURAL_MODELS: tuple[str, ...] = ("mtfm", "logistic", "dcnv2", "mmoe", "rankmixer", "mtgr", "onetrans", "star", "pepnet")
MODELS: tuple[str, ...] = (*NEURAL_MODELS, GBDT)
MODEL_LABELS = {
    "mtfm": "MTFM", "logistic": "LR", "dcnv2": "DCNv2", "mmoe": "MMoE", "rankmixer": "RankMixer", "mtgr": "MTGR",
    "onetrans": "OneTrans", "star": "STAR", "pepnet": "PEPNet", GBDT: "LightGBM",
}


class CompareConfig(BaseModel):
    """The shared budget and tuning grid of one comparison."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] = Field(default_factory=lambda: list(MODELS), min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="also stop every neural model after this many steps")
    patience: int | None = Field(1, ge=1)
    lr_factors: list[float] = Field(default_factory=lambda: [1 / 3, 1.0, 3.0], min_length=1)
    batch_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads per run (None: the trainer's default)")
    mtfm_model: str = Field("small", description="MTFM model preset or YAML")
    min_positives: int = Field(200, ge=1, description="test positives below which a cell cannot rank models")

    def check_models(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"--models: unknown {unknown}; expected some of {list(MODELS)}")


def quick_config(models: list[str] | None = None, threads: int | None = None) -> CompareConfig:
    """``--quick``: one seed, the preset lr (no sweep), one epoch of at most 150 steps: a smoke run
    of the whole pipeline that finishes in minutes, not a result to quote."""
    return CompareConfig(models=models or list(MODELS), seeds=[0], epochs=1, max_steps=150, patience=None,
                         lr_factors=[1.0], threads=threads)


@dataclass
class RunResult:
    """One trained model: its settings, the valid metrics that chose it and its test metrics."""

    model: str
    lr: float
    seed: int
    valid_score: float | None
    valid: "Metrics"
    test: "Metrics"
    train_seconds: float
    exposures_per_s: float | None
    settings: dict = field(default_factory=dict)


@dataclass
class ModelResult:
    """Everything one model of the comparison ran: the lr sweep and the seeds at the chosen lr."""

    model: str
    sweep: list[RunResult]
    chosen_lr: float
    runs: list[RunResult]
    wall_seconds: float


def preset_lr(model: str) -> float:
    """The lr the sweep is centred on: the model's training preset (LightGBM: its config's)."""
    if model == GBDT:
        from mtfm.baselines.gbdt import GBDTConfig

        return GBDTConfig().learning_rate
    from mtfm.train.config import load_train_config

    return load_train_config(model).lr


def _settings(model: str, lr: float, seed: int, cfg: CompareConfig) -> dict:
    return {"model": model, "lr": lr, "seed": seed, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
            "patience": cfg.patience, "batch_size": cfg.batch_size,
            "mtfm_model": cfg.mtfm_model if model == "mtfm" else None}


def _run_dir(out: Path, model: str, lr: float, seed: int) -> Path:
    return out / "runs" / model / f"lr{lr:.3g}-seed{seed}"


def _model_config(model: str, cfg: CompareConfig) -> dict:
    if model != "mtfm":
        return {}  # every baseline at its paper's defaults (its config class)
    from mtfm.model.config import load_model_config

    return load_model_config(cfg.mtfm_model).model_dump(mode="json")


def _train_neural(data: Path, run_dir: Path, model: str, lr: float, seed: int, cfg: CompareConfig) -> RunResult:
    from mtfm.train.config import load_train_config
    from mtfm.train.evaluate import evaluate_run, mean_gauc
    from mtfm.train.trainer import train_from_data

    overrides = dict(lr=lr, seed=seed, epochs=cfg.epochs, max_steps=cfg.max_steps, patience=cfg.patience,
                     batch_size=cfg.batch_size, progress=False, threads=cfg.threads)
    train_cfg = load_train_config(model).model_copy(update=overrides)
    result = train_from_data(data, run_dir, arch=model, model_config=_model_config(model, cfg), cfg=train_cfg)
    metrics = result.metrics
    valid = (metrics.get("best") or {}).get("valid") or metrics.get("final_valid") or {}
    test, _ = evaluate_run(run_dir, data, "test")
    throughput = metrics["throughput"]
    return RunResult(model, lr, seed, mean_gauc(valid), valid, test, throughput["train_seconds"],
                     throughput["exposures_per_s"])


def _train_gbdt(data: Path, run_dir: Path, lr: float, seed: int, cfg: CompareConfig) -> RunResult:
    from mtfm.baselines.gbdt import GBDTConfig, run_gbdt
    from mtfm.train.evaluate import mean_gauc

    # the neural models' trainer uses one thread unless told otherwise; LightGBM gets the same
    # (and with more threads than free cores its workers spin: 9x slower on a loaded 2-core VM)
    threads = cfg.threads if cfg.threads is not None else 1
    result = run_gbdt(data, GBDTConfig(learning_rate=lr, num_threads=threads), seed, run_dir)
    rate = result.exposures / result.train_seconds if result.train_seconds > 0 else None
    return RunResult(GBDT, lr, seed, mean_gauc(result.valid), result.valid, result.test, result.train_seconds, rate)


def run_one(data: Path, out: Path, model: str, lr: float, seed: int, cfg: CompareConfig) -> RunResult:
    """Train and test one (model, lr, seed), or reuse its finished run."""
    run_dir = _run_dir(out, model, lr, seed)
    settings = _settings(model, lr, seed, cfg)
    done = run_dir / "result.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings") == settings:
            return RunResult(**saved)
        raise ValueError(f"{done}: made with other settings {saved.get('settings')} than {settings}; "
                         "use another --out or remove that run")
    if run_dir.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    if model == GBDT:
        result = _train_gbdt(data, run_dir, lr, seed, cfg)
    else:
        result = _train_neural(data, run_dir, model, lr, seed, cfg)
    result.settings = settings
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=1))
    tmp.replace(done)
    return result


def _best(sweep: list[RunResult]) -> RunResult:
    scored = [r for r in sweep if r.valid_score is not None]
    if not scored:
        raise ValueError(f"{sweep[0].model}: no lr of the sweep produced a valid GAUC")
    return max(scored, key=lambda r: r.valid_score)


def run_model(data: Path, out: Path, model: str, cfg: CompareConfig,
              on_run: Callable[[RunResult], None] = lambda r: None) -> ModelResult:
    """The lr sweep (first seed), then every seed at the chosen lr."""
    start = time.perf_counter()
    base = preset_lr(model)
    sweep = []
    for factor in cfg.lr_factors:
        sweep.append(run_one(data, out, model, base * factor, cfg.seeds[0], cfg))
        on_run(sweep[-1])
    chosen = _best(sweep)
    runs = [chosen]
    for seed in cfg.seeds[1:]:
        runs.append(run_one(data, out, model, chosen.lr, seed, cfg))
        on_run(runs[-1])
    return ModelResult(model, sweep, chosen.lr, runs, time.perf_counter() - start)


def runs_per_model(cfg: CompareConfig) -> int:
    return len(cfg.lr_factors) + len(cfg.seeds) - 1


def run_comparison(data: str | Path, out: str | Path, cfg: CompareConfig, progress: bool = True) -> list[ModelResult]:
    """Every model of ``cfg.models`` in turn (one progress bar each); writes ``OUT/compare.json``,
    ``OUT/table.md`` and returns the results."""
    from tqdm import tqdm

    from mtfm.compare.table import write_report

    cfg.check_models()
    data, out = Path(data), Path(out)
    if not (data / "manifest.json").is_file():
        raise FileNotFoundError(f"{data / 'manifest.json'}: not a prepared data directory (run `mtfm prepare` first)")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in cfg.models:
        bar = tqdm(total=runs_per_model(cfg), desc=f"{MODEL_LABELS[model]:>9}", unit="run", disable=not progress)
        results.append(run_model(data, out, model, cfg, on_run=lambda r, bar=bar: bar.update(1)))
        bar.close()
        write_report(results, cfg, out, data)  # after every model: a partial table survives an interruption
    return results
