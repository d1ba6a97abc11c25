"""MMoE (Ma et al. 2018, Google, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts"), trained per scenario (the paper's group 1 of baselines,
section 4.1.2).

The architecture, as in its paper (its eq. 5-6):

* ``E`` shared **experts** ``f_i``, each a ReLU MLP on the input ``x``;
* one **gate per task** ``k``: ``g^k(x) = softmax(W_gk x)``, a linear map to ``E`` scores and a
  softmax, so every task mixes the same experts with its own input-dependent weights
  (:meth:`ScenarioMMoE.gates`);
* one **tower per task**: ``y_k = h^k(sum_i g^k(x)_i f_i(x))``, a ReLU MLP and a linear logit.

How it is adapted to this data (input and output choices, not architecture changes):

* the inputs of scenario ``s`` are :class:`~mtfm.baselines.common.ScenarioInputs`: the
  scenario's own user, cross and item feature embeddings (categorical and list-valued features
  embedded, numeric features through a linear encoder) and the user's behaviour sequences
  (history H and real-time R) pooled under MTFM's visibility rule, by default mean +
  DIN-style target attention per sequence type with the candidate item as the query
  (``inputs.history_pooling``); ``x`` is their concatenation ``user | cross | item | sequences``.
  MMoE itself reads a flat feature vector and no sequence; the pooled vectors are how
  industrial MMoE rankers see behaviour, and without them it would see less than MTFM does;
* tasks are the scenario's tasks from the schema (e.g. ctr and ctcvr, plus imd and write in
  SQS), one gate and one tower each, trained with the masked BCE summed over tasks
  (``task_mean``: equal task weights, as in the paper);
* trained per scenario (:class:`~mtfm.baselines.common.PerScenario`): one independent MMoE,
  with its own embedding tables, per scenario; so MMoE shares experts between the tasks of one
  scenario, never between scenarios (MTFM's own MMoE head shares across both);
* kept: experts, per-task softmax gates on the input, towers. Left out: nothing of the model;
  sizes are scaled to this data (4 experts of [128] -> 64, towers [32], MTFM-small widths).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtfm.baselines.common import BaselineOutput, InputConfig, PerScenario, ScenarioInputs, mlp
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch

PART_ORDER = ("user", "cross", "item", "sequences")  # the order x is concatenated in

__all__ = ["MMoEBaseline", "MMoEConfig", "BaselineOutput"]


class MMoEConfig(BaseModel):
    """Size of each scenario's MMoE (defaults: the paper's structure scaled to MTFM small)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: InputConfig = Field(default_factory=InputConfig, description="embedding widths and sequence pooling")
    num_experts: int = Field(4, ge=1, description="E: shared experts")
    expert_hidden: list[int] = Field(default_factory=lambda: [128], description="hidden widths of each expert MLP")
    expert_dim: int = Field(64, ge=1, description="output width of each expert (ReLU)")
    tower_hidden: list[int] = Field(default_factory=lambda: [32], description="hidden widths of each task tower")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _positive_widths(self) -> "MMoEConfig":
        if any(w <= 0 for w in [*self.expert_hidden, *self.tower_hidden]):
            raise ValueError(f"expert_hidden and tower_hidden widths must be positive, "
                             f"got {self.expert_hidden} and {self.tower_hidden}")
        return self


class ScenarioMMoE(nn.Module):
    """One scenario's MMoE: inputs -> x -> experts mixed by one gate per task -> one tower per task."""

    def __init__(self, schema: DataSchema, scenario: str, config: MMoEConfig) -> None:
        super().__init__()
        self.inputs = ScenarioInputs(schema, scenario, config.inputs)
        self.parts = [p for p in PART_ORDER if p in self.inputs.part_dims]
        dim, tasks = self.inputs.out_dim, len(schema.scenario(scenario).tasks)
        self.experts = nn.ModuleList(mlp(dim, [*config.expert_hidden, config.expert_dim], config.dropout)
                                     for _ in range(config.num_experts))
        self.gate = nn.ModuleList(nn.Linear(dim, config.num_experts) for _ in range(tasks))
        width = config.tower_hidden[-1] if config.tower_hidden else config.expert_dim
        self.towers = nn.ModuleList(
            nn.Sequential(mlp(config.expert_dim, list(config.tower_hidden), config.dropout), nn.Linear(width, 1))
            for _ in range(tasks)
        )

    def x(self, batch: JaggedBatch) -> Tensor:
        """``[n_s, d]``: the scenario's input parts, concatenated in :data:`PART_ORDER`."""
        parts = self.inputs(batch)
        return torch.cat([parts[p] for p in self.parts], dim=1)

    def gates(self, x: Tensor) -> Tensor:
        """``[n_s, num_tasks, num_experts]``: each task's softmax weights over the experts."""
        return torch.stack([torch.softmax(g(x), dim=-1) for g in self.gate], dim=1)

    def forward(self, batch: JaggedBatch) -> Tensor:
        x = self.x(batch)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [n, E, expert_dim]
        mixed = torch.einsum("nte,ned->ntd", self.gates(x), experts)  # [n, tasks, expert_dim]
        return torch.cat([tower(mixed[:, k]) for k, tower in enumerate(self.towers)], dim=1)


class MMoEBaseline(PerScenario):
    """MMoE per scenario: ``model(batch).logits[s]`` ``[n_s, num_tasks]``; ``model.loss(batch, out)``."""

    def __init__(self, schema: DataSchema, config: MMoEConfig | None = None) -> None:
        cfg = config or MMoEConfig()
        super().__init__(schema, lambda sch, name: ScenarioMMoE(sch, name, cfg))
        self.config = cfg
