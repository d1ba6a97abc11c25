"""Typed model configuration (pydantic), validated before any weight is created.

A model is fully described by the data schema (which tokens exist, which features they carry)
plus this config (how big the network is and how it is wired). Presets live in
``src/mtfm/configs/model_*.yaml``; :func:`load_model_config` accepts a file path or a preset
name (``"small"`` -> ``model_small.yaml``). Errors name the file and the field.

The HTA stack is ``(K:P)xB``: ``blocks`` (B) blocks, each made of ``target_layers_per_block``
(K) target-attention layers followed by ``full_layers_per_block`` (P) full-attention layers
(paper section 3.2.2 uses P = 1; the ablation configurations are written with P as well, e.g.
full attention only is ``(0:16)x1``). :func:`parse_hta` turns that notation into the three
numbers.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtfm.model.loss import LossWeighting
from mtfm.yamlio import safe_load

AttentionBackend = Literal["reference", "jagged", "triton", "auto"]


class ModelConfigError(ValueError):
    """A model configuration that does not validate; the message names file and field."""


class ModelConfig(BaseModel):
    """Size and wiring of one MTFM model (paper section 3.2).

    Defaults are a small CPU model; ``model_paper.yaml`` holds the paper's d_model = 768,
    B = 4, K = 3, H = 3, G = 1. Options described as ADDITION are not in the paper; they are off
    by default and in both presets (BENCHMARKS.md measures what each buys on the synthetic world).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- backbone --------------------------------------------------------------------------
    d_model: int = Field(default=64, gt=0, description="token width after the tokenizers")
    num_heads: int = Field(default=2, gt=0, description="H: query heads")
    num_kv_groups: int = Field(default=1, gt=0, description="G: key/value heads (GQA); must divide H")
    head_dim: int | None = Field(
        default=None, gt=0, description="per-head width of Q, K, V; None: d_model // num_heads"
    )
    blocks: int = Field(default=4, gt=0, description="B: HTA blocks")
    target_layers_per_block: int = Field(default=3, ge=0, description="K: target-attention layers per block")
    full_layers_per_block: int = Field(default=1, ge=0, description="P: full-attention layers per block")
    fuse_target_kv: bool = Field(
        default=True,
        description="compute the non-T key/value projections of a block's K target layers in one "
        "batched matmul (they all see the same non-T tokens)",
    )
    prune_last_full_layer: bool = Field(
        default=True,
        description="when the stack ends with a full layer, compute only its T rows: its non-T outputs "
        "reach nothing (exact; that layer then costs what a target layer costs)",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(default=1e-6, gt=0)

    # ---- attention -------------------------------------------------------------------------
    attention_backend: AttentionBackend = Field(
        default="auto",
        description="reference: padded dense mask (the truth); jagged: per-user blocks (CPU); triton: the GPU "
        "kernel (mtfm.kernels.triton_attention); auto: triton on CUDA when Triton is importable, else jagged",
    )
    attention_norm_len: int = Field(
        default=256,
        gt=0,
        description="fixed n in SiLU(QK^T) / n (HSTU divides by the max sequence length; a constant "
        "here so a user's output does not depend on which users share the batch)",
    )
    attention_alpha: float | None = Field(
        default=None,
        gt=0,
        description="scale of QK^T inside SiLU(alpha QK^T + bias); None: 1 / sqrt(head width). A larger "
        "alpha starts the pointwise attention outside SiLU's near-linear range, so keys can be told apart",
    )
    relative_time_bias: bool = Field(
        default=False,
        description="ADDITION (not in the paper): learned bias per head and log2 time-gap bucket, as in HSTU",
    )
    similarity_init: bool = Field(
        default=False,
        description="ADDITION (not in the paper; initial weights only): tokenizers start as one MLP over shared "
        "tables, queries start equal to keys and the gate U to the values, so target attention starts by "
        "matching alike tokens (a recent click on the exposure's own cuisine); see mtfm.model.init",
    )
    content_match: bool = Field(
        default=False,
        description="ADDITION (not in the paper): every attention score adds, per head and per embedding table a "
        "scenario shares with a sequence (share: in the schema, e.g. cuisine, item_id), a learned weight times the "
        "cosine of the query's and the key's embeddings in that table, so 'a recent click on this exposure's "
        "cuisine' is visible from step 0 instead of waiting for W_Q and W_K to align (mtfm.model.content)",
    )
    content_match_init: float = Field(
        default=1.0,
        description="initial weight of the content match (score units, per head and shared table; learns at "
        "the attention-bias lr, attention_bias_lr_scale)",
    )
    time_bias_buckets: int = Field(default=32, gt=1, description="bucket = min(floor(log2(1 + |dt|)), buckets - 1)")
    time_bias_init: Literal["zero", "horizons"] = Field(
        default="zero",
        description="initial time bias. zero: every gap alike. horizons: head h starts blind to gaps beyond its own "
        "horizon (bias -3 per log2 bucket past it), the horizons evenly spaced in log2 buckets from all gaps (head 0) "
        "to time_bias_shortest_horizon_s (the last head). Why: SiLU attention cannot learn to switch keys off (SiLU's "
        "minimum, at -1.28, has zero gradient and still weighs a key -0.28), so a head that should read the last "
        "minutes among hundreds of older actions has to start that way",
    )
    time_bias_shortest_horizon_s: float = Field(
        default=3600.0, gt=0, description="horizons init: the time gap the most recent-focused head sees up to"
    )
    time_bias_self_init: float = Field(
        default=0.0,
        le=0.0,
        description="initial time bias of gap bucket 0 (a gap under one time unit): in practice a token's own key, "
        "the only key a T-token sees at gap 0 (R keys are strictly earlier). Negative starts every head (nearly) "
        "blind to itself, e.g. -6: SiLU(-6) = -0.015. Why: a T-token's own key is its best query-key match, so "
        "in every head its own value drowns the one recent action that matches it (BENCHMARKS.md, issue 10)",
    )
    relative_position_bias: bool = Field(
        default=False,
        description="ADDITION (not in the paper): learned bias per head and log2 position-gap bucket, the gap "
        "counted over the keys the query sees (mtfm.kernels.common), so hidden tokens never shift it",
    )
    position_bias_buckets: int = Field(default=16, gt=1)
    jagged_padding_slack: float = Field(
        default=0.25, ge=0.0, description="jagged backend: a bucket of users may waste at most this share on padding"
    )

    # ---- embeddings and tokenizers -----------------------------------------------------------
    embedding_dim: int = Field(default=16, gt=0, description="embedding width of features that do not set one")
    numeric_dim: int = Field(default=4, gt=0, description="width of each numeric feature's encoder")
    tokenizer_hidden: list[int] = Field(default_factory=lambda: [128], description="hidden widths of each tokenizer MLP")

    # ---- MMoE head ---------------------------------------------------------------------------
    final_norm: bool = Field(
        default=False,
        description="ADDITION (not in the paper): Group LayerNorm on the final T-tokens before the MMoE",
    )
    mmoe_num_experts: int = Field(default=4, gt=0)
    mmoe_expert_hidden: list[int] = Field(default_factory=lambda: [128])
    mmoe_expert_dim: int = Field(default=64, gt=0, description="output width of each shared expert")
    mmoe_tower_hidden: list[int] = Field(default_factory=lambda: [32])

    # ---- loss --------------------------------------------------------------------------------
    loss_weighting: LossWeighting = Field(
        default="exposure",
        description="exposure: every labelled exposure weighs the same whatever its scenario (summed BCE / the "
        "batch's exposures); task_mean: every (scenario, task) adds its mean BCE. See mtfm.model.loss",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_options(cls, data: object) -> object:
        if isinstance(data, dict) and "share_embeddings_by_name" in data:
            raise ValueError(
                "share_embeddings_by_name was removed: embedding sharing is declared per feature in the data "
                "schema ('share: NAME' on the categorical features that should read one table; see README, "
                "'Embedding sharing'); delete this key"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_groups != 0:
            raise ValueError(
                f"num_kv_groups ({self.num_kv_groups}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim is None and self.d_model % self.num_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is set"
            )
        if self.target_layers_per_block + self.full_layers_per_block == 0:
            raise ValueError("a block needs at least one layer: target_layers_per_block + full_layers_per_block >= 1")
        for name in ("tokenizer_hidden", "mmoe_expert_hidden", "mmoe_tower_hidden"):
            bad = [w for w in getattr(self, name) if w <= 0]
            if bad:
                raise ValueError(f"{name} widths must be positive, got {getattr(self, name)}")
        return self

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def alpha(self) -> float:
        """The ``alpha`` of SiLU(alpha QK^T + bias)."""
        return self.attention_alpha if self.attention_alpha is not None else self.dim_per_head ** -0.5

    @property
    def num_layers(self) -> int:
        return self.blocks * (self.target_layers_per_block + self.full_layers_per_block)

    @property
    def hta(self) -> str:
        """The stack in the paper's notation, e.g. ``(3:1)x4``."""
        return f"({self.target_layers_per_block}:{self.full_layers_per_block})x{self.blocks}"

    def with_hta(self, spec: str) -> "ModelConfig":
        """The same config with another ``(K:P)xB`` stack (for the HTA ablation)."""
        k, p, b = parse_hta(spec)
        return self.model_copy(update={"target_layers_per_block": k, "full_layers_per_block": p, "blocks": b})


_HTA_RE = re.compile(r"^\(\s*(\d+)\s*:\s*(\d+)\s*\)\s*[xX]\s*(\d+)$")


def parse_hta(spec: str) -> tuple[int, int, int]:
    """``"(3:1)x4"`` -> ``(K=3, P=1, B=4)``; the paper's ablation notation (Table 3)."""
    m = _HTA_RE.match(spec.strip())
    if not m:
        raise ModelConfigError(f"HTA spec {spec!r}: expected '(K:P)xB', e.g. '(3:1)x4'")
    k, p, b = (int(g) for g in m.groups())
    if b == 0 or k + p == 0:
        raise ModelConfigError(f"HTA spec {spec!r}: needs B >= 1 and K + P >= 1")
    return k, p, b


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid model config ({err.error_count()} problem(s))"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def model_config_from_dict(raw: object, source: str = "<model config>") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        raise ModelConfigError(_format_error(err, source)) from None


def preset_names() -> list[str]:
    """Names of the model presets shipped in ``mtfm/configs`` (``model_<name>.yaml``)."""
    root = resources.files("mtfm") / "configs"
    files = [p.name for p in root.iterdir() if p.name.startswith("model_") and p.name.endswith(".yaml")]
    return sorted(name[len("model_") : -len(".yaml")] for name in files)


def _resolve(path_or_preset: str | Path) -> Path:
    path = Path(path_or_preset)
    if path.is_file():
        return path
    if isinstance(path_or_preset, str) and re.fullmatch(r"[A-Za-z0-9_]+", path_or_preset):
        preset = Path(str(resources.files("mtfm") / "configs" / f"model_{path_or_preset}.yaml"))
        if preset.is_file():
            return preset
        raise ModelConfigError(f"{path_or_preset}: no such file and no such preset (presets: {preset_names()})")
    raise ModelConfigError(f"{path}: model config file not found")


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and validate a model config YAML (a path, or a preset name such as ``"small"``)."""
    file = _resolve(path)
    try:
        raw = safe_load(file.read_text())  # a key given twice is an error naming both lines
    except yaml.YAMLError as err:
        raise ModelConfigError(f"{file}: not valid YAML: {err}") from None
    return model_config_from_dict(raw, str(file))


def dump_model_config(config: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
