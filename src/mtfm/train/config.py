"""Typed training configuration (pydantic), validated before any work starts.

A bad value fails at load time naming the field, like the data schema does. Defaults follow
the paper where it says something (Adam, lr 3e-4, section 4.1.3) and are small elsewhere so a
CPU run is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtfm.train.selection import Selection
from mtfm.yamlio import safe_load


class TrainConfigError(ValueError):
    """A training configuration that does not validate; the message names file and field."""


class TrainConfig(BaseModel):
    """How to train one model on one prepared data directory.

    ``epochs`` bounds the run; ``max_steps`` (optimizer steps, counted over the whole run)
    stops it earlier, possibly mid-epoch (a checkpoint is written there, so the run can be
    resumed with a larger budget). At the end of each epoch the valid split is scored; ``select``
    (default: GAUC weighted by users scored, over all (scenario, task) pairs; see
    :mod:`mtfm.train.selection`) selects the ``best`` snapshot, the same metric over each
    scenario's own tasks (or that scenario's override) selects ``best-<scenario>``, and early
    stopping waits for any of them to improve.
    """

    # allow_inf_nan=False: a learning rate (or any float setting) of nan or inf is refused at load,
    # not discovered as a NaN loss some steps later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1, description="aggregated samples (users) per batch, per rank")
    eval_batch_size: int = Field(default=256, ge=1)
    seed: int = 0

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    embedding_optimizer: Literal["shared", "adam", "adagrad"] = Field(
        default="shared",
        description="shared: embeddings are trained by the dense optimizer; adam/adagrad: a separate "
        "optimizer (with embedding_lr) for every nn.Embedding / nn.EmbeddingBag weight",
    )
    embedding_lr: float | None = Field(default=None, gt=0, description="None: the same as lr")
    sparse_embedding_updates: bool = Field(
        default=False,
        description="embedding lookups give sparse gradients and the embedding optimizer updates only the rows a "
        "batch touched (adagrad: the same math as dense; adam: lazy Adam, torch.optim.SparseAdam). Needs "
        "embedding_optimizer adam or adagrad (mtfm.train.optim)",
    )
    attention_bias_lr_scale: float = Field(
        default=1.0, gt=0,
        description="the attention's relative time / position biases and content-match weights learn at lr times this. Adam moves a "
        "parameter by about lr per step, so at lr 3e-4 a bias needs ~10,000 steps to reach -3 and make a head "
        "ignore old actions; weights move as fast but act through products, biases do not",
    )
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global L2 norm of the gradients; None: off")
    bf16: bool = Field(default=False, description="bf16 autocast for forward and loss")

    select: Selection = Field(
        default_factory=Selection,
        description="valid metric that selects the best snapshots and drives early stopping: gauc, auc or logloss, "
        "plus per-scenario overrides SCENARIO[=METRIC][@TASK+TASK] (mtfm.train.selection); a string or a mapping",
    )
    patience: int | None = Field(
        default=2, ge=1,
        description="epochs in which neither the overall selection score nor any scenario's improved, before stopping",
    )
    min_delta: float = Field(default=0.0, ge=0)
    checkpoint_every: int | None = Field(default=None, ge=1, description="also checkpoint every N steps mid-epoch")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1, description="steps between CSV log rows")
    progress: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        default=None, ge=1,
        description="torch intra-op CPU threads. None: $OMP_NUM_THREADS if set (torchrun sets it), else one "
        "core less than the machine has, so the loader's prefetch thread keeps a core (measured on 2 cores: "
        "1 thread trains 2x faster end to end than 2, whose OpenMP workers wait on the loader)",
    )
    deterministic: bool = True
    prefetch: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "TrainConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self

    @model_validator(mode="after")
    def _sparse_needs_own_optimizer(self) -> "TrainConfig":
        if self.sparse_embedding_updates and self.embedding_optimizer == "shared":
            raise ValueError("sparse_embedding_updates needs the embeddings' own optimizer: set embedding_optimizer "
                             "to adam (lazy Adam) or adagrad; the shared dense optimizer cannot take sparse gradients")
        return self

    # Fields that may change between an interrupted run and its resumption: the budget and
    # how the run reports itself. Everything else must match, or the resumed run would not
    # be the same run. ``select`` is not among them: the best snapshots and the early-stopping
    # count a run holds were chosen by its selection, and comparing them with scores of another
    # metric would be meaningless.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"epochs", "max_steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "prefetch", "patience"}
    )


def cpu_threads(cfg: TrainConfig) -> int | None:
    """The intra-op thread count to set for ``cfg`` on CPU, or None to leave torch's own."""
    if cfg.threads is not None:
        return cfg.threads
    if "OMP_NUM_THREADS" in os.environ or cfg.prefetch == 0:
        return None
    return max(1, (os.cpu_count() or 1) - 1)


def train_config_from_dict(raw: object, source: str = "<train config>") -> TrainConfig:
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise TrainConfigError(f"{source}: invalid training config ({err.error_count()} problem(s))\n{problems}") from None


TRAIN_PRESETS = ("mtfm", "logistic", "dcnv2", "mmoe", "rankmixer", "mtgr", "onetrans", "star", "pepnet")  # src/mtfm/configs/train_<name>.yaml: each arch's measured defaults


def train_preset_path(name: str) -> Path:
    """The packaged training preset of an arch (``mtfm``, ``logistic``)."""
    from importlib import resources

    if name not in TRAIN_PRESETS:
        raise TrainConfigError(f"unknown training preset {name!r}; expected one of {list(TRAIN_PRESETS)} or a YAML path")
    return Path(str(resources.files("mtfm") / "configs" / f"train_{name}.yaml"))


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config YAML: a path, or a preset name (``mtfm``, ``logistic``)."""
    path = train_preset_path(str(path)) if str(path) in TRAIN_PRESETS else Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: training config file not found")
    try:
        raw = safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: not valid YAML: {err}") from None
    return train_config_from_dict(raw, str(path))


def resume_mismatches(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Fields that differ between a checkpoint's config and a resume request and may not."""
    a, b = saved.model_dump(), requested.model_dump()
    return sorted(k for k in a if k not in TrainConfig.RESUMABLE_CHANGES and a[k] != b[k])


def describe_mismatches(saved: TrainConfig, requested: TrainConfig, fields: list[str]) -> str:
    """``field: saved -> requested`` for each of ``fields`` (the resume refusal's detail)."""
    parts = []
    for k in fields:
        if k == "select":
            parts.append(f"select: the run selects by {str(saved.select)!r}, the resume asks for "
                         f"{str(requested.select)!r} (its best snapshots and early stopping followed the run's; "
                         "start a new run to select by another metric)")
        else:
            parts.append(f"{k}: {getattr(saved, k)!r} -> {getattr(requested, k)!r}")
    return "; ".join(parts)
