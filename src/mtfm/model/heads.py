"""MMoE prediction heads on the final T-token embeddings (paper section 3.2.2, ref. [14]).

Experts are shared by every scenario and task (the knowledge the scenarios have in common);
each (scenario, task) has its own softmax gate over the experts and its own tower, which ends
in one logit. A scenario's heads only touch its own gates and towers, so
:meth:`MMoE.subset` can hand one scenario's heads to a subgraph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.model.config import ModelConfig
from mtfm.model.embedding import module_key
from mtfm.model.layers import MLP, shallow_copy


class MMoE(nn.Module):
    """Shared experts, a gate and a tower per (scenario, task)."""

    def __init__(self, config: ModelConfig, tasks: dict[str, list[str]]) -> None:
        super().__init__()
        self.tasks = {s: list(t) for s, t in tasks.items()}
        self.experts = nn.ModuleList(
            nn.Sequential(MLP(config.d_model, config.mmoe_expert_hidden, config.mmoe_expert_dim, config.dropout), nn.SiLU())
            for _ in range(config.mmoe_num_experts)
        )
        self.gates = nn.ModuleDict()
        self.towers = nn.ModuleDict()
        for scenario, names in self.tasks.items():
            for task in names:
                key = module_key(scenario, task)
                self.gates[key] = nn.Linear(config.d_model, config.mmoe_num_experts)
                self.towers[key] = MLP(config.mmoe_expert_dim, config.mmoe_tower_hidden, 1, config.dropout)

    def forward(self, x: Tensor, scenario: str) -> Tensor:
        """``[n, num_tasks]`` logits of scenario ``scenario`` for its ``[n, d_model]`` T-tokens."""
        if scenario not in self.tasks:
            raise KeyError(f"no heads for scenario {scenario!r}; the model has {sorted(self.tasks)}")
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [n, E, expert_dim]
        logits = []
        for task in self.tasks[scenario]:
            key = module_key(scenario, task)
            gate = F.softmax(self.gates[key](x), dim=-1)  # [n, E]
            mixed = torch.einsum("ne,ned->nd", gate, experts)
            logits.append(self.towers[key](mixed))
        return torch.cat(logits, dim=1)

    def subset(self, scenario: str) -> "MMoE":
        """Heads of one scenario, sharing the experts and that scenario's gates and towers."""
        new = shallow_copy(self)
        new.tasks = {scenario: self.tasks[scenario]}
        keys = [module_key(scenario, t) for t in self.tasks[scenario]]
        new.gates = nn.ModuleDict({k: self.gates[k] for k in keys})
        new.towers = nn.ModuleDict({k: self.towers[k] for k in keys})
        return new
