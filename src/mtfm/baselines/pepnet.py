"""PEPNet: one gated network for all scenarios and tasks (the paper's group-3 baseline).

Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information" (KDD 2023, Kuaishou). One model is trained on every scenario's
exposures at once. Its building block is the Gate Neural Unit
``gate(x) = gamma * sigmoid(W2 relu(W1 x + b1) + b2)`` with ``gamma = 2`` (:class:`GateNU`),
so a gate can scale a signal up as well as down and starts near 1. As adapted to this data:

* **General embedding E** (:class:`~mtfm.baselines.alignment.AlignedInputs`): the scenarios'
  own features aligned to one template (see that module for the policy; most of a row is
  missing-value filler), plus the shared behaviour sequences pooled under MTFM's visibility
  rule (:class:`~mtfm.baselines.common.SequencePooling`). Its *fields* are the template's
  columns and the pooled block of each sequence type.
* **EPNet** (embedding personalisation, domain side): a Gate NU over the domain-side features
  ``E(F_d)`` concatenated with the stop-gradient of E, ``delta = U_ep(E(F_d) ⊕ sg(E))``, one
  gate per field, broadcast over the field's width: ``O_ep = delta ⊗ E`` (our reading of the
  paper's ``delta_domain`` in R^k for k feature fields; ``epnet_gates: element`` gives one gate
  per embedding element instead, as some open implementations do). The domain-side
  feature here is a learned scenario embedding (scenario index in schema order); the paper's
  domain statistics features are left out (this data has none, and statistics of the batch
  would make a score depend on which other exposures share it).
* **PPNet** (parameter personalisation, user/item side): one DNN tower per task; the input of
  every tower layer (O_ep, then each hidden layer's units) is scaled per task by a Gate NU
  over the personalised priors ``E(F_u) ⊕ E(F_i) ⊕ sg(O_ep)``: the aligned user and item
  columns (user features and item ids; this data has no user-id or author-id feature, which the
  paper uses) and the stop-gradient of the EPNet output. One Gate NU per layer gives every
  task's gates at once, as in the paper.

**Multi-scenario, multi-task**: towers are per task *name* over all scenarios (``ctr``,
``ctcvr``), shared by the scenarios that have that task; the scenario enters only through
EPNet (and the template's missing-value pattern). Scenario ``s`` reads its own tasks in
schema order. Left out: the paper's separate sparse/dense optimisers and its feature set.
Loss: the ``exposure`` weighting of :func:`~mtfm.model.loss.masked_bce_loss` (shared
parameters: every labelled exposure weighs the same, as for MTFM).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtfm.baselines.alignment import AlignedInputs, TaskColumns
from mtfm.baselines.common import BaselineOutput, InputConfig
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch
from mtfm.model.loss import masked_bce_loss


Width = Annotated[int, Field(ge=1)]


class PEPNetConfig(BaseModel):
    """PEPNet's widths, scaled from the paper's to this data (MTFM small: embedding 16, d_model 64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: InputConfig = InputConfig()
    tower_hidden: list[Width] = Field(default_factory=lambda: [128, 64], min_length=1,
                                    description="hidden widths of each task's DNN tower")
    gate_hidden: int = Field(64, ge=1, description="hidden width of every Gate NU")
    gate_scale: float = Field(2.0, gt=0.0, description="gamma of the Gate NU: gates lie in (0, gamma)")
    scenario_dim: int = Field(16, ge=1, description="width of the scenario embedding (EPNet's domain feature)")
    epnet_gates: Literal["field", "element"] = Field(
        "field", description="EPNet scales each feature field (column, pooled sequence type) or each element of E")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class GateNU(nn.Module):
    """``scale * sigmoid(W2 relu(W1 x + b1) + b2)``: PEPNet's Gate Neural Unit."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(self.net(x))


class TaskTowers(nn.Module):
    """``T`` DNN towers run as batched matmuls; layer inputs scaled by per-task gates (PPNet).

    Weights ``[T, out, in]`` per layer (the last layer outputs one logit per task).
    """

    def __init__(self, num_tasks: int, widths: list[int], dropout: float) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(widths, [*widths[1:], 1]):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default init, per task
            self.weights.append(nn.Parameter(torch.empty(num_tasks, b, a).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_tasks, b).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, gates: list[Tensor], tasks: Tensor) -> Tensor:
        """``x`` ``[n, in]``; ``gates[l]`` ``[T_all, n, width_l]``; ``tasks``: the towers to run.

        Returns ``[n, len(tasks)]``.
        """
        h = x.unsqueeze(0) * gates[0].index_select(0, tasks)
        last = len(self.weights) - 1
        for l, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.index_select(0, tasks).unsqueeze(1), h, w.index_select(0, tasks).transpose(1, 2))
            if l < last:
                h = self.dropout(torch.relu(h)) * gates[l + 1].index_select(0, tasks)
        return h.squeeze(2).transpose(0, 1)


class PEPNet(nn.Module):
    """PEPNet over the aligned template (module doc); ``model(batch).logits[s]``: ``[n_s, tasks_s]``."""

    def __init__(self, schema: DataSchema, config: PEPNetConfig | None = None) -> None:
        super().__init__()
        self.schema, self.config = schema, config or PEPNetConfig()
        cfg = self.config
        self.columns = TaskColumns(schema)
        self.scenario_index, self.task_names = self.columns.scenario_index, self.columns.task_names
        self.inputs = AlignedInputs(schema, cfg.inputs)
        dim = self.inputs.out_dim
        self.register_buffer("field_sizes", torch.tensor(self.inputs.field_dims), persistent=False)
        self.scenario_embedding = nn.Embedding(len(schema.scenarios), cfg.scenario_dim)
        num_gates = len(self.inputs.field_dims) if cfg.epnet_gates == "field" else dim
        self.epnet = GateNU(cfg.scenario_dim + dim, cfg.gate_hidden, num_gates, cfg.gate_scale)
        self.prior_parts = [p for p in ("user", "item") if p in self.inputs.part_dims]
        prior_dim = sum(self.inputs.part_dims[p] for p in self.prior_parts) + dim
        self.layer_widths = [dim, *cfg.tower_hidden]
        num_t = len(self.task_names)
        self.ppnet = nn.ModuleList(GateNU(prior_dim, cfg.gate_hidden, w * num_t, cfg.gate_scale)
                                   for w in self.layer_widths)
        self.towers = TaskTowers(num_t, self.layer_widths, cfg.dropout)

    def task_columns(self, scenario: str) -> Tensor:
        """Columns of scenario's tasks (schema order) among :attr:`task_names`."""
        return self.columns(scenario)

    def domain_gate(self, general: Tensor, scenario: str) -> Tensor:
        """EPNet's gates ``[n, num_fields]`` (or ``[n, dim]``) for rows ``general`` (E) of ``scenario``."""
        ids = torch.full((general.shape[0],), self.scenario_index[scenario], dtype=torch.long, device=general.device)
        return self.epnet(torch.cat([self.scenario_embedding(ids), general.detach()], 1))

    def personalised_embedding(self, general: Tensor, scenario: str) -> Tensor:
        """EPNet's output ``O_ep = delta ⊗ E`` (field gates broadcast over each field's width)."""
        delta = self.domain_gate(general, scenario)
        if self.config.epnet_gates == "field":
            delta = torch.repeat_interleave(delta, self.field_sizes, dim=1, output_size=general.shape[1])
        return general * delta

    def task_gates(self, prior: Tensor, o_ep: Tensor) -> list[Tensor]:
        """PPNet's gates per tower layer input: ``[T_all, n, width_l]``."""
        x = torch.cat([prior, o_ep.detach()], 1)
        n, num_t = x.shape[0], len(self.task_names)
        return [gate(x).view(n, num_t, w).transpose(0, 1) for gate, w in zip(self.ppnet, self.layer_widths)]

    def scenario_logits(self, parts: dict[str, Tensor], scenario: str) -> Tensor:
        """``[n, tasks]`` logits of one scenario's rows (``parts``: :class:`AlignedInputs` output)."""
        general = torch.cat(list(parts.values()), 1)
        o_ep = self.personalised_embedding(general, scenario)
        prior = torch.cat([parts[p] for p in self.prior_parts], 1)
        gates = self.task_gates(prior, o_ep)
        return self.towers(o_ep, gates, self.task_columns(scenario))

    def forward(self, batch: JaggedBatch) -> BaselineOutput:
        parts = self.inputs(batch)
        return BaselineOutput({s: self.scenario_logits(named, s).float() for s, named in parts.items()})

    def loss(self, batch: JaggedBatch, out: BaselineOutput) -> Tensor:
        return masked_bce_loss(self.schema, batch, out.logits, "exposure")
