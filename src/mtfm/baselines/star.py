"""STAR: one star-topology network for all scenarios (the paper's group-3 baseline).

Sheng et al., "One Model to Serve All: Star Topology Adaptive Recommender for Multi-Domain
CTR Prediction" (CIKM 2021, Alibaba). One model is trained on every scenario's exposures at
once; its three parts, as adapted to this data:

* **Inputs** (:class:`~mtfm.baselines.alignment.AlignedInputs`): the scenarios' own features
  aligned to one template (see that module for the policy; the cost is that most of a row is
  missing-value filler), plus the shared behaviour sequences pooled under MTFM's visibility
  rule (mean + DIN target attention, :class:`~mtfm.baselines.common.SequencePooling`). The
  embedding tables are shared by all scenarios, as in the paper.
* **Partitioned normalisation** (:class:`PartitionedNorm`) of the concatenated input:
  ``(gamma * gamma_s) * (x - mu) / sqrt(var + eps) + (beta + beta_s)`` with shared and
  per-scenario affine parameters; in training ``mu, var`` are the batch statistics of scenario
  ``s``'s rows only (the paper draws each batch from one domain; here a batch mixes scenarios,
  so each scenario's rows form its own partition), and each scenario keeps its own moving
  averages, which evaluation (``model.eval()``) uses.
* **Star-topology FCN** (:class:`StarLinear` layers): layer weight ``W ⊙ W_s`` and bias
  ``b + b_s``, shared centre ``W, b`` and per-scenario ``W_s, b_s`` (``W_s`` starts at ones,
  ``b_s`` at zero, so every scenario starts from the shared network).
* **Auxiliary network**: a small MLP over the scenario indicator's embedding (the scenario
  index in schema order, the only domain-describing feature this data has) concatenated with
  the normalised input; its logits are added to the star network's, so scenario-specific
  biases are learnt directly.

**Multi-task adaptation** (STAR itself predicts one CTR): the last star layer and the
auxiliary network output one logit per task *name* over all scenarios (e.g. ``ctr``,
``ctcvr``); the centre weight of a task is shared by the scenarios that have it, and scenario
``s`` reads its own tasks in schema order. Left out: the paper's per-domain batch sampling
(batches here mix scenarios, as for MTFM) and PN inside hidden layers (only the input is
partition-normalised, as in the paper's figure). Loss: the ``exposure`` weighting of
:func:`~mtfm.model.loss.masked_bce_loss` (parameters are shared, so every labelled exposure
weighs the same, as for MTFM).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtfm.baselines.alignment import AlignedInputs, TaskColumns
from mtfm.baselines.common import BaselineOutput, InputConfig, mlp
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch
from mtfm.model.loss import masked_bce_loss


Width = Annotated[int, Field(ge=1)]


class STARConfig(BaseModel):
    """STAR's widths, scaled from the paper's to this data (MTFM small: embedding 16, d_model 64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: InputConfig = InputConfig()
    star_hidden: list[Width] = Field(default_factory=lambda: [256, 128, 64], min_length=1,
                                   description="widths of the star-topology FCN's hidden layers")
    aux_hidden: list[Width] = Field(default_factory=lambda: [64], description="auxiliary network's hidden widths")
    scenario_dim: int = Field(16, ge=1, description="width of the scenario-indicator embedding (auxiliary net)")
    pn_momentum: float = Field(0.1, gt=0.0, le=1.0, description="moving-average rate of PN's statistics")
    pn_eps: float = Field(1e-5, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PartitionedNorm(nn.Module):
    """Batch normalisation with per-scenario statistics and affine parameters (STAR's PN).

    Buffers ``running_mean`` / ``running_var`` are ``[num_scenarios, dim]``: a training forward
    on scenario ``s``'s rows updates only row ``s``. A training partition of fewer than two rows
    has no variance: it is normalised with its running statistics, which it leaves unchanged.
    """

    def __init__(self, num_scenarios: int, dim: int, momentum: float, eps: float) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.scenario_gamma = nn.Parameter(torch.ones(num_scenarios, dim))
        self.scenario_beta = nn.Parameter(torch.zeros(num_scenarios, dim))
        self.register_buffer("running_mean", torch.zeros(num_scenarios, dim))
        self.register_buffer("running_var", torch.ones(num_scenarios, dim))

    def forward(self, x: Tensor, scenario: int) -> Tensor:
        x = x.float()
        if self.training and x.shape[0] > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                n = x.shape[0]
                self.running_mean[scenario].lerp_(mean.detach(), self.momentum)
                self.running_var[scenario].lerp_(var.detach() * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean[scenario], self.running_var[scenario]
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return x_hat * (self.gamma * self.scenario_gamma[scenario]) + (self.beta + self.scenario_beta[scenario])


class StarLinear(nn.Module):
    """``x @ (W ⊙ W_s)^T + (b + b_s)``: a shared centre and one partition per scenario."""

    def __init__(self, num_scenarios: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        centre = nn.Linear(in_dim, out_dim)  # PyTorch's default init for the shared centre
        self.weight = nn.Parameter(centre.weight.detach().clone())
        self.bias = nn.Parameter(centre.bias.detach().clone())
        self.scenario_weight = nn.Parameter(torch.ones(num_scenarios, out_dim, in_dim))
        self.scenario_bias = nn.Parameter(torch.zeros(num_scenarios, out_dim))

    def forward(self, x: Tensor, scenario: int) -> Tensor:
        weight = self.weight * self.scenario_weight[scenario]
        return nn.functional.linear(x, weight, self.bias + self.scenario_bias[scenario])


class STAR(nn.Module):
    """STAR over the aligned template (module doc); ``model(batch).logits[s]``: ``[n_s, tasks_s]``."""

    def __init__(self, schema: DataSchema, config: STARConfig | None = None) -> None:
        super().__init__()
        self.schema, self.config = schema, config or STARConfig()
        cfg = self.config
        self.columns = TaskColumns(schema)
        self.scenario_index, self.task_names = self.columns.scenario_index, self.columns.task_names
        num_s, num_t = len(schema.scenarios), len(self.task_names)
        self.inputs = AlignedInputs(schema, cfg.inputs)
        dim = self.inputs.out_dim
        self.norm = PartitionedNorm(num_s, dim, cfg.pn_momentum, cfg.pn_eps)
        widths = [dim, *cfg.star_hidden]
        self.star = nn.ModuleList(StarLinear(num_s, a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.star_out = StarLinear(num_s, widths[-1], num_t)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scenario_embedding = nn.Embedding(num_s, cfg.scenario_dim)
        self.aux = mlp(cfg.scenario_dim + dim, cfg.aux_hidden)
        self.aux_out = nn.Linear(cfg.aux_hidden[-1] if cfg.aux_hidden else cfg.scenario_dim + dim, num_t)

    def task_columns(self, scenario: str) -> Tensor:
        """Columns of scenario's tasks (schema order) among :attr:`task_names`."""
        return self.columns(scenario)

    def scenario_logits(self, x: Tensor, scenario: str) -> Tensor:
        """``[n, tasks]`` logits of one scenario's input rows ``x`` (``[n, inputs.out_dim]``)."""
        s = self.scenario_index[scenario]
        z = self.norm(x, s)
        h = z
        for layer in self.star:
            h = self.dropout(torch.relu(layer(h, s)))
        indicator = self.scenario_embedding(torch.full((z.shape[0],), s, dtype=torch.long, device=z.device))
        logits = self.star_out(h, s) + self.aux_out(self.aux(torch.cat([indicator, z], 1)))
        return logits.index_select(1, self.task_columns(scenario))

    def forward(self, batch: JaggedBatch) -> BaselineOutput:
        parts = self.inputs(batch)
        logits = {}
        for scenario, named in parts.items():
            logits[scenario] = self.scenario_logits(torch.cat(list(named.values()), 1), scenario).float()
        return BaselineOutput(logits)

    def loss(self, batch: JaggedBatch, out: BaselineOutput) -> Tensor:
        return masked_bce_loss(self.schema, batch, out.logits, "exposure")
