"""The training loop: optimizers, clipping, bf16, logging, early stopping, exact resume, DDP.

:func:`fit` trains any model with the MTFM interface (``model(batch).logits[scenario]`` and
``model.loss(batch, out)``) on any batch source with the loader interface
(``num_batches(epoch)``, ``iterate(epoch, start_batch)``, deterministic for its seed). It is
the same code in one process and under torchrun (see :mod:`mtfm.train.distributed`).

Exactness of resume. A checkpoint is taken *between* steps and holds everything the next
step depends on: weights, optimizer moments, each rank's RNG states, the epoch and the index
of the next batch (the loader replays an epoch's order from its seed and skips to that
batch), the running loss sums and the early-stopping state. Interrupting a run at any step
and resuming it therefore gives bit-identical weights and metrics on CPU with deterministic
settings (tested). Evaluation, early stopping and the ``best`` snapshot happen at epoch
ends only, so where a run was interrupted does not change what it selects.
"""

from __future__ import annotations

import csv
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch
from mtfm.dirlock import hold_dir_lock
from mtfm.train.checkpoint import CheckpointError, CheckpointManager, read_json, write_json
from mtfm.train.config import TrainConfig, cpu_threads, describe_mismatches, resume_mismatches
from mtfm.train.distributed import DistContext, all_max_int, all_sum_floats, same_on_all_ranks
from mtfm.train.evaluate import Metrics, compute_metrics, gather_predictions, mean_gauc, predict
from mtfm.train.extend import WarmStart, resume_warm_start
from mtfm.train.extend import warm_start as extend_warm_start
from mtfm.train.optim import clip_grad_norm, make_optimizers, use_sparse_embedding_gradients
from mtfm.train.rundata import check_run_data, data_record


class BatchSource(Protocol):
    """What the trainer needs from a loader (``mtfm.data.loader.BatchLoader`` has it)."""

    def num_batches(self, epoch: int) -> int: ...

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[JaggedBatch]: ...


class TrainState(BaseModel):
    """Progress of a run; saved in every checkpoint's state.json."""

    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # steps of `epoch` already taken
    step: int = 0  # optimizer steps over the whole run
    epoch_loss_sum: float = 0.0  # this rank's, over this epoch's real (non-padding) steps
    epoch_loss_steps: int = 0
    epoch_padding_steps: int = 0
    padding_steps: int = 0  # this rank's, whole run
    # pointer name ("best", "best-<scenario>") -> {"score", "epoch", "step"} of its snapshot
    best: dict[str, dict] = Field(default_factory=dict)
    epochs_without_gain: int = 0
    history: list[dict] = Field(default_factory=list)
    stop_reason: str | None = None  # epochs | early_stopping | max_steps


@dataclass
class TrainResult:
    state: TrainState
    metrics: dict  # what metrics.json holds
    model: nn.Module  # the trained (last) weights, unwrapped


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new uninitialised tensor with NaN (a debugging aid
        # that catches reads of uninitialised memory). No kernel here reads one, so results do
        # not depend on it, but the fills cost 12-15% of a small-preset CPU step (profile in
        # benchmarks/results/issue13_profile.md); bit-identical resume stays tested.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


class CsvLog:
    """Append-only CSV of training steps; on resume, rows after the checkpoint are dropped."""

    FIELDS = ("step", "epoch", "batch", "loss", "exposures_per_s", "tokens_per_s", "lr", "elapsed_s",
              "valid_score", "select")
    # A training row leaves valid_score and select empty; the row written at an epoch's end has
    # the epoch's mean train loss in ``loss``, the overall selection score of the valid split in
    # ``valid_score`` and the selection that computed it in ``select`` (throughput columns empty).

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is None or not path.is_file():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        else:  # keep only what happened up to the checkpoint we resume from
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, self.FIELDS)
                w.writeheader()
                w.writerows(rows)

    def write(self, **row: float | str) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _task_names(schema: DataSchema) -> dict[str, list[str]]:
    return {s.name: s.task_names for s in schema.scenarios}


def evaluate_split(
    model: nn.Module, data: BatchSource, schema: DataSchema, ctx: DistContext, *, bf16: bool = False
) -> Metrics:
    """Metrics of ``model`` on every batch of ``data``, predictions gathered over ranks first."""
    names = _task_names(schema)
    preds = predict(model, data.iterate(0), ctx.device, names, bf16=bf16)
    return compute_metrics(gather_predictions(ctx, preds), names)


class _LossForward(nn.Module):
    """``batch -> loss``: the module DDP wraps.

    DDP (with ``find_unused_parameters``) walks the autograd graph back from what forward
    returns to learn which parameters will receive a gradient. Returning the model's outputs
    would include logits the loss does not use (a scenario with no rows in the batch, a task
    with no observed label): DDP would wait forever for their gradients. The loss is exactly
    what backward starts from.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: JaggedBatch) -> torch.Tensor:
        return self.model.loss(batch, self.model(batch))


class _Window:
    """Loss and volume of the real (non-padding) steps since the last log row."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = self.exposures = self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: JaggedBatch) -> None:
        self.loss += loss.float()
        self.steps += 1
        self.exposures += batch.num_exposures
        self.tokens += batch.num_tokens


class Trainer:
    """One training run in ``run_dir``; see :func:`fit`."""

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        valid_data: BatchSource,
        schema: DataSchema,
        cfg: TrainConfig,
        run_dir: str | Path,
        run_config: dict,
        ctx: DistContext,
        step_hook: Callable[[TrainState], None] | None = None,
    ) -> None:
        self.model = model.to(ctx.device)
        self.train_data, self.valid_data, self.schema, self.cfg = train_data, valid_data, schema, cfg
        cfg.select.check(schema)  # an unknown scenario or task fails before any work
        self.run_dir, self.ctx = Path(run_dir), ctx
        self.run_config = {**run_config, "train": cfg.model_dump(mode="json")}
        self.step_hook = step_hook
        if cfg.sparse_embedding_updates:  # before DDP wraps the model: its reducer sees the sparse gradients
            use_sparse_embedding_gradients(model)
        self.wrapped: nn.Module = _LossForward(model)
        if ctx.initialized:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # A batch may miss a scenario (or a task's labels), leaving its tokenizer and heads
            # without gradient; DDP finds those by walking the graph back from the loss.
            self.wrapped = DistributedDataParallel(self.wrapped, device_ids=ids, find_unused_parameters=True)
        self.optimizers = make_optimizers(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ckpt = CheckpointManager(
            self.run_dir, rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier, keep=cfg.keep_checkpoints
        )
        self.state = TrainState()
        self.seen = {"exposures": 0.0, "tokens": 0.0, "seconds": 0.0, "steps": 0.0}

    # ---- checkpoints ------------------------------------------------------------------------

    def restore(self) -> None:
        """Load the newest intact checkpoint; a damaged one is skipped, with a warning naming the
        file, for the one before it (every rank agreeing; see ``CheckpointManager.load_resumable``)."""
        def check(ckpt: Path) -> None:
            saved = TrainConfig.model_validate(read_json(ckpt / "config.json")["train"])
            bad = resume_mismatches(saved, self.cfg)
            if bad:
                raise CheckpointError(
                    f"{ckpt}: cannot resume exactly, these training settings differ from the checkpoint: {bad} "
                    f"({describe_mismatches(saved, self.cfg, bad)})"
                )

        _, raw = self.ckpt.load_resumable(model=self.model, optimizers=self.optimizers, check=check,
                                          agree=lambda ok: all_max_int(self.ctx, int(not ok)) == 0)
        raw.pop("world_size", None)
        self.state = TrainState.model_validate(raw)

    def _save(self) -> None:
        self.ckpt.save(
            step=self.state.step,
            model=self.model,
            optimizers=self.optimizers,
            state=self.state.model_dump(mode="json"),
            config=self.run_config,
        )

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self, batch: JaggedBatch, weight: float = 1.0) -> torch.Tensor:
        """One optimizer step on ``batch`` (loss scaled by ``weight``; 0 = a padding step); returns the loss."""
        batch = batch.to(self.ctx.device, non_blocking=True)
        with torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss = self.wrapped(batch)
        (loss * weight).backward()
        if self.cfg.grad_clip is not None:
            clip_grad_norm(self.params, self.cfg.grad_clip)
        for opt in self.optimizers.values():
            opt.step()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _epoch_batches(self, epoch: int, local: int) -> Iterator[tuple[JaggedBatch, bool]]:
        """This rank's batches from ``state.batch`` on, then padding replays (see distributed.py)."""
        start = self.state.batch
        last: JaggedBatch | None = None
        for batch in self.train_data.iterate(epoch, start_batch=min(start, local)):
            last = batch
            yield batch, False
        if last is None:  # resumed inside the padding tail: fetch the batch to replay
            last = next(iter(self.train_data.iterate(epoch, start_batch=local - 1)))
        while True:
            yield last, True

    def _train_epoch(self, epoch: int) -> bool:
        """Steps of one epoch from ``state.batch``; True when it ran to the epoch's end.

        The epoch's loss sum is accumulated step by step in float64 on the device (no host
        sync per step) and copied into the state before any checkpoint, so an interrupted
        and resumed epoch adds the same numbers in the same order as an uninterrupted one.
        """
        cfg, st, ctx = self.cfg, self.state, self.ctx
        local = self.train_data.num_batches(epoch)
        if local == 0:
            raise ValueError(f"rank {ctx.rank} has no training batches in epoch {epoch}; use fewer ranks or more shards")
        steps = all_max_int(ctx, local)
        self.model.train()
        bar = tqdm(total=steps, initial=st.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True, leave=False)
        epoch_loss = torch.tensor(st.epoch_loss_sum, dtype=torch.float64, device=ctx.device)
        window = _Window(ctx.device)
        source = self._epoch_batches(epoch, local)
        try:
            while st.batch < steps:
                if cfg.max_steps is not None and st.step >= cfg.max_steps:
                    self._log(window, bar)
                    return False
                batch, padding = next(source)
                loss = self.train_step(batch, 0.0 if padding else 1.0)
                st.batch += 1
                st.step += 1
                if padding:
                    st.epoch_padding_steps += 1
                    st.padding_steps += 1
                else:
                    epoch_loss += loss.double()
                    st.epoch_loss_steps += 1
                    window.add(loss, batch)
                bar.update(1)
                if window.steps >= cfg.log_every or st.batch == steps:
                    self._log(window, bar)
                    window = _Window(ctx.device)
                if self.step_hook is not None:
                    self.step_hook(st)
                if cfg.checkpoint_every is not None and st.step % cfg.checkpoint_every == 0 and st.batch < steps:
                    st.epoch_loss_sum = float(epoch_loss.item())
                    self._save()
        finally:
            st.epoch_loss_sum = float(epoch_loss.item())
            source.close()  # stops the loader's prefetch thread now, not at garbage collection
            bar.close()
        return True

    def _log(self, window: "_Window", bar: tqdm) -> None:
        """Check the loss, add the window to the throughput totals, write a CSV row and the bar."""
        st, ctx = self.state, self.ctx
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        loss_sum = float(window.loss.item())
        if not np.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is {loss_sum} at step {st.step} (epoch {st.epoch}, batch {st.batch})")
        self.seen["exposures"] += window.exposures
        self.seen["tokens"] += window.tokens
        self.seen["seconds"] += elapsed
        self.seen["steps"] += window.steps
        if ctx.is_main and window.steps > 0:
            mean_loss = loss_sum / window.steps
            exp_s, tok_s = window.exposures / elapsed * ctx.world_size, window.tokens / elapsed * ctx.world_size
            lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            self.log.write(step=st.step, epoch=st.epoch, batch=st.batch, loss=mean_loss, exposures_per_s=exp_s,
                           tokens_per_s=tok_s, lr=lr, elapsed_s=elapsed)
            bar.set_postfix(loss=f"{mean_loss:.4f}", exp_s=f"{exp_s:,.0f}", tok_s=f"{tok_s:,.0f}")

    # ---- epochs -----------------------------------------------------------------------------

    def _end_epoch(self) -> None:
        """Evaluate, update the best snapshots and early stopping, reset the epoch sums.

        Selection is per scenario as well as overall: ``best-<S>`` is the epoch with scenario
        S's best valid score, ``best`` the epoch with the best score over all scenarios, each
        score as ``cfg.select`` says (default: GAUC weighted by users scored; see
        :mod:`mtfm.train.selection`). In a multi-scenario run the big scenarios may start to
        overfit while a small one still gains (it sees far fewer labels per epoch); each
        scenario is served by its own subgraph (paper 3.1), so each can come from its own best
        epoch. Training stops once ``patience`` epochs passed without any of these improving.
        """
        st, cfg = self.state, self.cfg
        loss_sum, loss_steps, padding = all_sum_floats(
            self.ctx, [st.epoch_loss_sum, float(st.epoch_loss_steps), float(st.epoch_padding_steps)]
        )
        valid = evaluate_split(self.model, self.valid_data, self.schema, self.ctx, bf16=cfg.bf16)
        scores = cfg.select.scores(valid)
        train_loss = loss_sum / max(1.0, loss_steps)
        st.history.append({
            "epoch": st.epoch + 1, "step": st.step, "train_loss": train_loss,
            "padding_steps": int(padding), "valid_mean_gauc": mean_gauc(valid),
            "valid_scenario_gauc": {s: mean_gauc({s: valid[s]}) for s in valid},
            "select": str(cfg.select), "selection_score": scores["best"],
            "selection_scenario_scores": {s: scores[f"best-{s}"] for s in valid}, "valid": valid,
        })
        if self.ctx.is_main:
            self.log.write(step=st.step, epoch=st.epoch, batch=st.batch, loss=train_loss,
                           valid_score="" if scores["best"] is None else scores["best"], select=str(cfg.select))
        improved = {}
        for pointer, score in scores.items():
            previous = st.best.get(pointer)
            if score is not None and (previous is None or score > previous["score"] + cfg.min_delta):
                st.best[pointer] = improved[pointer] = {"score": score, "epoch": st.epoch + 1, "step": st.step}
        if improved:
            st.epochs_without_gain = 0
            why = {p: {**info, "select": cfg.select.rule(p)} for p, info in improved.items()}
            self.ckpt.save_snapshot(step=st.step, model=self.model, config=self.run_config, pointers=why)
        else:
            st.epochs_without_gain += 1
        st.epoch += 1
        st.batch = 0
        st.epoch_loss_sum, st.epoch_loss_steps, st.epoch_padding_steps = 0.0, 0, 0

    def _should_stop(self) -> str | None:
        st, cfg = self.state, self.cfg
        if cfg.patience is not None and st.epochs_without_gain >= cfg.patience:
            return "early_stopping"
        if st.epoch >= cfg.epochs:
            return "epochs"
        if cfg.max_steps is not None and st.step >= cfg.max_steps:
            return "max_steps"
        return None

    def run(self, resume: bool = False) -> TrainResult:
        """Train (or resume) to the end; rank 0 holds the run directory's lock meanwhile
        (:mod:`mtfm.dirlock`), so a second run into it fails instead of interleaving."""
        with hold_dir_lock(self.run_dir, "mtfm train") if self.ctx.is_main else nullcontext():
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        if resume:
            self.restore()
        elif self.ckpt.latest() is not None:
            raise CheckpointError(f"{self.run_dir} already holds a run; resume it (--resume) or choose a new --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main:
            self.log = CsvLog(self.run_dir / "train_log.csv", self.state.step if resume else None)
        stop = self._should_stop() if resume else None
        final_valid = None
        while stop is None:
            finished = self._train_epoch(self.state.epoch)
            if not finished:  # max_steps inside the epoch: checkpoint there, report, do not select
                if self.ckpt.latest() != self.ckpt.root / f"step-{self.state.step:08d}":
                    self._save()
                final_valid = evaluate_split(self.model, self.valid_data, self.schema, self.ctx, bf16=self.cfg.bf16)
                stop = "max_steps"
                break
            self._end_epoch()
            stop = self._should_stop()  # identical on every rank: the state is
            self._save()
        self.state.stop_reason = stop
        metrics = self._metrics(final_valid)
        if self.ctx.is_main:
            write_json(self.run_dir / "metrics.json", metrics)
        self.ctx.barrier()
        return TrainResult(state=self.state, metrics=metrics, model=self.model)

    def _metrics(self, final_valid: Metrics | None) -> dict:
        st = self.state
        seen = dict(zip(("exposures", "tokens", "seconds", "steps"), all_sum_floats(
            self.ctx, [self.seen["exposures"], self.seen["tokens"], self.seen["seconds"], self.seen["steps"]])))
        seconds = seen["seconds"] / self.ctx.world_size  # ranks run side by side
        overall = st.best.get("best")
        best = next((h for h in st.history if overall and h["epoch"] == overall["epoch"]), None)
        return {
            "status": st.stop_reason,
            "arch": self.run_config.get("arch"),
            "scenarios": [s.name for s in self.schema.scenarios],
            "world_size": self.ctx.world_size,
            # DDP keeps replicas identical; checked, not assumed (padding steps must not break it)
            "ranks_in_sync": same_on_all_ranks(self.ctx, list(self.model.parameters())),
            "data": self.run_config.get("data"),
            # --init-from: where the weights started (mtfm.train.extend); the frozen names are in config.json
            "init": {k: v for k, v in self.run_config["init"].items() if k != "frozen"} if "init" in self.run_config else None,
            "steps": st.step,
            "epochs_completed": len(st.history),
            "padding_steps": int(all_sum_floats(self.ctx, [float(st.padding_steps)])[0]),
            "select": str(self.cfg.select),
            "best": None if best is None else {"epoch": best["epoch"], "step": best["step"],
                                               "selection_score": best.get("selection_score"),
                                               "valid_mean_gauc": best["valid_mean_gauc"], "valid": best["valid"]},
            "best_by_scenario": {s: st.best[f"best-{s}"] for s in self.schema.scenario_names if f"best-{s}" in st.best},
            "final_valid": final_valid,
            "history": st.history,
            "throughput": {
                "note": "this process's training steps only (a resumed run counts from its resume)",
                "train_seconds": seconds,
                "exposures_per_s": seen["exposures"] / seconds if seconds > 0 else None,
                "tokens_per_s": seen["tokens"] / seconds if seconds > 0 else None,
                "steps_per_s": seen["steps"] / self.ctx.world_size / seconds if seconds > 0 else None,
            },
        }


def fit(
    model: nn.Module,
    train_data: BatchSource,
    valid_data: BatchSource,
    schema: DataSchema,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    run_config: dict,
    ctx: DistContext | None = None,
    resume: bool = False,
    step_hook: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train ``model`` in ``run_dir`` (checkpoints, train_log.csv, metrics.json); see module doc.

    ``run_config`` is stored in every checkpoint (``arch``, ``model``, ``schema``, ... ) so the
    model can be rebuilt; ``step_hook`` is called after every step (tests use it to interrupt).
    """
    trainer = Trainer(model, train_data, valid_data, schema, cfg, run_dir, run_config, ctx or DistContext(), step_hook)
    return trainer.run(resume=resume)


# --------------------------------------------------------------------------------------------
# From a prepared data directory (what `mtfm train` runs)
# --------------------------------------------------------------------------------------------


def _rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for dropout and the like, derived from the run seed."""
    return int(np.random.SeedSequence([seed, rank, 1]).generate_state(1)[0])


def _check_resumable(run_dir: Path, run_config: dict, data_dir: str | Path, allow_other_data: bool) -> dict:
    """Refuse to resume a run with another model, scenarios or schema, or (unless allowed) on
    other data than its checkpoints record; return the latest checkpoint's run config."""
    candidates = CheckpointManager(run_dir).resume_candidates()
    if not candidates:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from")
    latest = candidates[0]
    saved = {"drop_inputs": [], **read_json(latest / "config.json")}  # runs from before input ablations
    for key in ("arch", "model", "scenarios", "drop_inputs", "schema"):
        if saved.get(key) != run_config.get(key):
            raise CheckpointError(f"{latest}/config.json: the run was started with another {key!r}; cannot resume it")
    check_run_data(saved.get("data"), data_dir, run=str(run_dir), action="resume", allow_other_data=allow_other_data)
    return saved


def train_from_data(
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    arch: str,
    model_config: dict,
    cfg: TrainConfig,
    scenarios: list[str] | None = None,
    drop_inputs: Sequence[str] = (),
    resume: bool = False,
    allow_other_data: bool = False,
    warm_start: WarmStart | None = None,
) -> TrainResult:
    """Train on ``data_dir`` (train split; valid split for early stopping), in one process or
    under torchrun (each rank reads its own shards). Writes checkpoints and metrics.json. The run
    records ``data_dir``'s fingerprint (:mod:`mtfm.train.rundata`): ``resume`` on data with another
    one is refused unless ``allow_other_data``.

    ``scenarios`` and ``drop_inputs`` (kinds of :data:`mtfm.config.INPUT_KINDS`) restrict what
    the model sees; both are recorded in the run so evaluation reads the data the same way.
    ``warm_start`` (``--init-from``, ``--freeze``) copies another run's weights by name and shape
    and freezes some (:mod:`mtfm.train.extend`); the run records it as ``init``."""
    from mtfm.data.loader import BatchLoader
    from mtfm.train.distributed import setup, teardown
    from mtfm.train.models import build_model

    ctx = setup(cfg.device)
    threads = cpu_threads(cfg)
    if threads is not None and ctx.device.type == "cpu":
        torch.set_num_threads(threads)
    seed_everything(cfg.seed, cfg.deterministic)
    common = dict(rank=ctx.rank, world_size=ctx.world_size, prefetch=cfg.prefetch, scenarios=scenarios,
                  drop_inputs=list(drop_inputs))
    train = BatchLoader(data_dir, "train", cfg.batch_size, shuffle=True, seed=cfg.seed, **common)
    valid = BatchLoader(data_dir, "valid", cfg.eval_batch_size, shuffle=False, seed=0, **common)
    schema = train.schema
    model = build_model(arch, model_config, schema)
    counts = all_sum_floats(ctx, [train.num_samples, train.skipped_samples, valid.num_samples, valid.skipped_samples])
    run_config = {
        "arch": arch,
        "model": model_config,
        "scenarios": schema.scenario_names,
        "drop_inputs": list(drop_inputs),
        "schema": schema.model_dump(mode="json"),
        "data": {
            **data_record(data_dir),  # dir and fingerprint
            "train_samples": int(counts[0]),
            "valid_samples": int(counts[2]),
            # samples without an exposure in the trained scenarios (single-scenario runs)
            "skipped_samples": {"train": int(counts[1]), "valid": int(counts[3])},
        },
    }
    if resume:
        saved = _check_resumable(Path(run_dir), run_config, data_dir, allow_other_data)
        init = resume_warm_start(model, saved, warm_start, str(run_dir))
    else:
        init = None if warm_start is None else extend_warm_start(model, run_config, warm_start, Path(run_dir),
                                                                  verbose=ctx.is_main)
    if init is not None:
        run_config["init"] = init
    if ctx.is_main and (counts[1] or counts[3]):
        print(f"samples without an exposure in {schema.scenario_names} skipped: "
              f"train {int(counts[1]):,}, valid {int(counts[3]):,}")
    seed_everything(_rank_seed(cfg.seed, ctx.rank), cfg.deterministic)
    result = fit(model, train, valid, schema, cfg, run_dir, run_config=run_config, ctx=ctx, resume=resume)
    # Only after success: a rank that failed must exit (torchrun then stops its peers), not
    # wait in a barrier for peers that are waiting for it.
    teardown(ctx)
    return result
