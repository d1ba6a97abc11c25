"""RankMixer (Zhu et al. 2025, ByteDance, "RankMixer: Scaling Up Ranking Models in Industrial
Recommenders"), trained per scenario (the paper's group 1 of baselines, section 4.1.2).

The architecture, as in its paper:

* **feature tokenization**: the feature embeddings, concatenated in semantic order, are split
  into ``T`` equal chunks and each chunk is projected to width ``D`` by its own linear map
  (RankMixer's "semantic grouping, then split into T tokens of dimension d");
* ``L`` **RankMixer blocks**, post-norm residual:
  ``S = LN(TokenMixing(X) + X)``, ``X' = LN(PFFN(S) + S)``;

  - **multi-head token mixing** is parameter-free: every token is cut into ``H`` heads of width
    ``D / H`` and output token ``h`` is the concatenation of head ``h`` of every token, in token
    order (:func:`token_mixing`). As in the paper ``H = T``, so the output is again ``T`` tokens of
    width ``D`` and the residual applies;
  - the **per-token FFN** gives each token position its own two-layer GELU MLP
    (``D -> ffn_mult * D -> D``), so the parameters grow with ``T`` while each token keeps its
    own feature subspace;
* **mean pooling** of the ``T`` output tokens, then one tower (MLP and a linear logit) per task.

The paper's Sparse-MoE variant of the per-token FFN (ReLU routing, dense-training /
sparse-inference) is **not implemented**: the dense per-token FFN is RankMixer's base model
and the one its scaling results start from.

How it is adapted to this data (every change is an input choice, not an architecture change):

* the inputs of scenario ``s`` are :class:`~mtfm.baselines.common.ScenarioInputs`: the
  scenario's own user, cross and item feature embeddings and the user's behaviour sequences
  pooled under MTFM's visibility rule (mean + DIN-style target attention per sequence type,
  only the actions an exposure may see). RankMixer itself feeds sequence-module outputs as
  feature tokens the same way; the semantic order of the concatenation is
  ``user | cross | item | sequences``;
* when the concatenated width is not a multiple of ``T`` it is zero-padded to the next one (the
  paper sizes its groups; here the schema decides the width);
* trained per scenario (:class:`~mtfm.baselines.common.PerScenario`): one independent
  RankMixer, with its own embedding tables, per scenario; the loss is the masked BCE summed
  over tasks (``task_mean``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtfm.baselines.common import BaselineOutput, InputConfig, PerScenario, ScenarioInputs, mlp
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch

PART_ORDER = ("user", "cross", "item", "sequences")  # the semantic order the tokens are cut from

__all__ = ["RankMixer", "RankMixerConfig", "token_mixing", "BaselineOutput"]


class RankMixerConfig(BaseModel):
    """Size of each scenario's RankMixer (defaults near MTFM's small preset: width 64, 2 blocks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: InputConfig = Field(default_factory=InputConfig, description="embedding widths and sequence pooling")
    num_tokens: int = Field(8, ge=1, description="T: feature tokens (also the mixing heads H, as in the paper)")
    d_model: int = Field(64, ge=1, description="D: token width; must be divisible by num_tokens")
    num_blocks: int = Field(2, ge=1, description="L: RankMixer blocks")
    ffn_mult: int = Field(4, ge=1, description="hidden width of each per-token FFN, in units of D")
    tower_hidden: list[int] = Field(default_factory=lambda: [32], description="hidden widths of each task tower")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-6, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "RankMixerConfig":
        if self.d_model % self.num_tokens != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_tokens ({self.num_tokens}): "
                             "token mixing cuts every token into num_tokens heads")
        if any(w <= 0 for w in self.tower_hidden):
            raise ValueError(f"tower_hidden widths must be positive, got {self.tower_hidden}")
        return self


def token_mixing(x: Tensor, heads: int) -> Tensor:
    """RankMixer's parameter-free multi-head token mixing of ``x`` ``[n, T, D]``.

    Token ``t`` is cut into ``heads`` pieces of width ``D / heads``; output token ``h`` is
    ``concat_t(piece h of token t)``, so the result is ``[n, heads, T * D / heads]``. With
    ``heads == T`` this is a fixed permutation of the ``T * D`` numbers: every output token
    holds one slice of every input token, which is how information crosses tokens without an
    attention matrix.
    """
    n, t, d = x.shape
    if d % heads != 0:
        raise ValueError(f"token width {d} is not divisible by {heads} heads")
    return x.reshape(n, t, heads, d // heads).transpose(1, 2).reshape(n, heads, t * (d // heads))


class PerTokenLinear(nn.Module):
    """``T`` independent linear maps, token ``t`` through map ``t``: ``[n, T, in] -> [n, T, out]``.

    One batched weight ``[T, in, out]`` (an einsum), initialised like ``nn.Linear`` per token.
    """

    def __init__(self, tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(tokens, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nti,tio->nto", x, self.weight) + self.bias


class PerTokenFFN(nn.Module):
    """Each token position's own ``Linear -> GELU -> Linear`` (the paper's PFFN)."""

    def __init__(self, tokens: int, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = PerTokenLinear(tokens, dim, hidden)
        self.down = PerTokenLinear(tokens, hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class RankMixerBlock(nn.Module):
    """``S = LN(TM(X) + X)``, ``X' = LN(PFFN(S) + S)`` (post-norm, as in the paper)."""

    def __init__(self, config: RankMixerConfig) -> None:
        super().__init__()
        t, d = config.num_tokens, config.d_model
        self.heads = t
        self.norm_mix = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = PerTokenFFN(t, d, config.ffn_mult * d, config.dropout)
        self.norm_ffn = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_mix(token_mixing(x, self.heads) + x)
        return self.norm_ffn(self.ffn(x) + x)


class ScenarioRankMixer(nn.Module):
    """One scenario's RankMixer: inputs -> T tokens -> L blocks -> mean pool -> one tower per task."""

    def __init__(self, schema: DataSchema, scenario: str, config: RankMixerConfig) -> None:
        super().__init__()
        self.inputs = ScenarioInputs(schema, scenario, config.inputs)
        self.parts = [p for p in PART_ORDER if p in self.inputs.part_dims]
        self.num_tokens = config.num_tokens
        self.chunk = math.ceil(self.inputs.out_dim / config.num_tokens)
        self.tokenize = PerTokenLinear(config.num_tokens, self.chunk, config.d_model)
        self.blocks = nn.ModuleList(RankMixerBlock(config) for _ in range(config.num_blocks))
        tasks = schema.scenario(scenario).task_names
        width = config.tower_hidden[-1] if config.tower_hidden else config.d_model
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(config.d_model, list(config.tower_hidden), config.dropout), nn.Linear(width, 1))
            for _ in tasks
        )

    def tokens(self, batch: JaggedBatch) -> Tensor:
        """``[n_s, T, D]``: the semantically ordered feature vector cut into T chunks, each projected."""
        parts = self.inputs(batch)
        x = torch.cat([parts[p] for p in self.parts], dim=1)
        pad = self.chunk * self.num_tokens - x.shape[1]
        if pad:
            x = F.pad(x, (0, pad))
        return self.tokenize(x.reshape(x.shape[0], self.num_tokens, self.chunk))

    def forward(self, batch: JaggedBatch) -> Tensor:
        x = self.tokens(batch)
        for block in self.blocks:
            x = block(x)
        pooled = x.mean(dim=1)
        return torch.cat([tower(pooled) for tower in self.towers], dim=1)


class RankMixer(PerScenario):
    """RankMixer per scenario: ``model(batch).logits[s]`` ``[n_s, num_tasks]``; ``model.loss(batch, out)``."""

    def __init__(self, schema: DataSchema, config: RankMixerConfig | None = None) -> None:
        cfg = config or RankMixerConfig()
        super().__init__(schema, lambda sch, name: ScenarioRankMixer(sch, name, cfg))
        self.config = cfg
