"""DCNv2 (Wang et al. 2021, Google, "DCN V2: Improved Deep & Cross Network and Practical Lessons
for Web-scale Learning to Rank Systems"), trained per scenario (the paper's group 1 of
baselines, section 4.1.2).

The architecture, as in its paper:

* the **cross network v2**: ``L`` cross layers on the concatenated input ``x0``,
  ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` with a full-rank ``W_l`` (``d x d``) per layer
  (:class:`CrossLayer`; ``*`` is the element-wise product), so layer ``l`` holds feature crosses
  up to order ``l + 1``;
* optionally (``cross="mix"``) the paper's **low-rank mixture-of-experts** cross layer
  ("DCN-Mix", its eq. 3): ``x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l`` with experts
  ``E_i(x_l) = x0 * (U_i g(C_i g(V_i^T x_l)) + b_l)`` of rank ``r``, ``g = tanh``, and a softmax
  gate ``G(x_l)`` over the experts (:class:`MixCrossLayer`);
* the **stacked** structure (the paper's default for its production models): cross layers, then
  a ReLU DNN on their output; ``structure="parallel"`` runs the DNN on ``x0`` beside the cross
  network and concatenates both, the paper's other structure;
* the output layer: one linear logit per task on the last layer (the paper's single logit,
  widened to the scenario's tasks: shared cross and deep layers, one output weight vector each).

How it is adapted to this data (input and output choices, not architecture changes):

* the inputs of scenario ``s`` are :class:`~mtfm.baselines.common.ScenarioInputs`: the
  scenario's own user, cross and item feature embeddings (categorical and list-valued features
  embedded, numeric features through a linear encoder) and the user's behaviour sequences
  (history H and real-time R) pooled under MTFM's visibility rule, by default mean +
  DIN-style target attention per sequence type with the candidate item as the query
  (``inputs.history_pooling``); ``x0`` is their concatenation ``user | cross | item | sequences``.
  DCNv2 itself reads no sequence; industrial DCNv2 deployments feed such pooled vectors as
  features, and without them it would see less than MTFM does;
* tasks are the scenario's tasks from the schema, one logit each, trained with the masked BCE
  summed over tasks (``task_mean``); the original is single-task;
* trained per scenario (:class:`~mtfm.baselines.common.PerScenario`): one independent DCNv2,
  with its own embedding tables, per scenario;
* left out: the paper's training-recipe choices (its embedding sizes, l2 regularisation,
  batch norm); sizes are scaled to this data (MTFM-small widths, 3 cross layers, DNN [256, 128]).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtfm.baselines.common import BaselineOutput, InputConfig, PerScenario, ScenarioInputs, mlp
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch

PART_ORDER = ("user", "cross", "item", "sequences")  # the order x0 is concatenated in

__all__ = ["DCNv2", "DCNv2Config", "CrossLayer", "MixCrossLayer", "BaselineOutput"]


class DCNv2Config(BaseModel):
    """Size of each scenario's DCNv2 (defaults: the paper's stacked DCN-V2 scaled to MTFM small)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: InputConfig = Field(default_factory=InputConfig, description="embedding widths and sequence pooling")
    cross_layers: int = Field(3, ge=0, description="L: cross layers (0 leaves a plain DNN)")
    cross: Literal["full", "mix"] = Field("full", description="full-rank W, or the low-rank mixture of experts")
    low_rank: int = Field(32, ge=1, description="r: rank of each expert of a 'mix' cross layer")
    num_experts: int = Field(4, ge=1, description="experts per 'mix' cross layer")
    structure: Literal["stacked", "parallel"] = Field("stacked", description="DNN after the cross net, or beside it")
    deep_hidden: list[int] = Field(default_factory=lambda: [256, 128], description="widths of the ReLU DNN")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _positive_widths(self) -> "DCNv2Config":
        if any(w <= 0 for w in self.deep_hidden):
            raise ValueError(f"deep_hidden widths must be positive, got {self.deep_hidden}")
        return self


class CrossLayer(nn.Module):
    """One full-rank cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l`` (DCN-V2 eq. 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.linear.weight)  # the paper's Glorot init, zero bias
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class MixCrossLayer(nn.Module):
    """Low-rank mixture-of-experts cross layer (DCN-Mix, DCN-V2 eq. 3).

    ``x_{l+1} = sum_i G_i(x_l) * x0 * (U_i tanh(C_i tanh(V_i^T x_l)) + b) + x_l``: each expert
    crosses in an ``r``-dimensional subspace (``2 d r + r^2`` weights instead of ``d^2``), the
    softmax gate mixes them per example.
    """

    def __init__(self, dim: int, rank: int, experts: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.empty(experts, dim, rank))
        self.c = nn.Parameter(torch.empty(experts, rank, rank))
        self.u = nn.Parameter(torch.empty(experts, rank, dim))
        for w in (self.v, self.c, self.u):
            for e in range(experts):
                nn.init.xavier_uniform_(w.data[e])
        self.bias = nn.Parameter(torch.zeros(dim))
        self.gate = nn.Linear(dim, experts)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("nd,edr->ner", x, self.v))
        h = torch.tanh(torch.einsum("ner,ers->nes", h, self.c))
        experts = x0[:, None, :] * (torch.einsum("ner,erd->ned", h, self.u) + self.bias)  # [n, E, d]
        weights = torch.softmax(self.gate(x), dim=-1)  # [n, E]
        return (weights[:, :, None] * experts).sum(dim=1) + x


class ScenarioDCNv2(nn.Module):
    """One scenario's DCNv2: inputs -> x0 -> cross layers and DNN (stacked or parallel) -> task logits."""

    def __init__(self, schema: DataSchema, scenario: str, config: DCNv2Config) -> None:
        super().__init__()
        self.inputs = ScenarioInputs(schema, scenario, config.inputs)
        self.parts = [p for p in PART_ORDER if p in self.inputs.part_dims]
        dim = self.inputs.out_dim
        self.cross = nn.ModuleList(_cross_layer(dim, config) for _ in range(config.cross_layers))
        self.structure = config.structure
        self.deep = mlp(dim, list(config.deep_hidden), config.dropout)
        deep_out = config.deep_hidden[-1] if config.deep_hidden else dim
        out_dim = deep_out + (dim if config.structure == "parallel" else 0)
        self.output = nn.Linear(out_dim, len(schema.scenario(scenario).tasks))

    def x0(self, batch: JaggedBatch) -> Tensor:
        """``[n_s, d]``: the scenario's input parts, concatenated in :data:`PART_ORDER`."""
        parts = self.inputs(batch)
        return torch.cat([parts[p] for p in self.parts], dim=1)

    def cross_net(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return x

    def forward(self, batch: JaggedBatch) -> Tensor:
        x0 = self.x0(batch)
        if self.structure == "stacked":
            return self.output(self.deep(self.cross_net(x0)))
        return self.output(torch.cat([self.cross_net(x0), self.deep(x0)], dim=1))


def _cross_layer(dim: int, config: DCNv2Config) -> nn.Module:
    if config.cross == "full":
        return CrossLayer(dim)
    return MixCrossLayer(dim, config.low_rank, config.num_experts)


class DCNv2(PerScenario):
    """DCNv2 per scenario: ``model(batch).logits[s]`` ``[n_s, num_tasks]``; ``model.loss(batch, out)``."""

    def __init__(self, schema: DataSchema, config: DCNv2Config | None = None) -> None:
        cfg = config or DCNv2Config()
        super().__init__(schema, lambda sch, name: ScenarioDCNv2(sch, name, cfg))
        self.config = cfg
