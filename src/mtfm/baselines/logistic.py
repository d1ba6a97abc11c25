"""Logistic regression on each scenario's own exposure features: the floor MTFM must beat.

For every scenario and task, ``logit = bias + sum of one learned weight per feature``:
a weight per id for categorical features (an ``nn.Embedding`` of width = number of tasks), a
pooled weight per id for list-valued features (``nn.EmbeddingBag``), a linear weight for
numeric features. It reads only the T-token features of a scenario (its user, cross and item
features, paper eq. 4 inputs) and no behaviour sequence and no other scenario, so
"MTFM - LR" measures what sequences, attention and multi-scenario sharing add, and
"(MTFM - LR) / (oracle - LR)" the share of the reachable gain MTFM collects.

Same interface as :class:`mtfm.model.mtfm.MTFM`: ``model(batch)`` returns an object whose
``logits`` maps scenario -> ``[n_s, num_tasks]`` (schema task order); ``model.loss(batch, out)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mtfm.config import CategoricalFeature, DataSchema, MultiCategoricalFeature, NumericFeature, ScenarioSpec
from mtfm.data.batch import FeatureTensors, JaggedBatch
from mtfm.model.loss import masked_bce_loss


class LogisticConfig(BaseModel):
    """Nothing to size: the model is fixed by the schema. Kept for a uniform run config."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class LogisticOutput:
    logits: dict[str, Tensor]  # scenario -> [n_s, num_tasks]


class _ScenarioLR(nn.Module):
    """One scenario's weights: per feature group (user / cross / item), per feature, per task."""

    def __init__(self, spec: ScenarioSpec) -> None:
        super().__init__()
        tasks = len(spec.tasks)
        self.spec = spec
        self.bias = nn.Parameter(torch.zeros(tasks))
        self.categorical = nn.ModuleDict()
        self.multi = nn.ModuleDict()
        self.numeric = nn.ParameterDict()
        for group, features in spec.feature_groups.items():
            for f in features:
                key = f"{group}__{f.name}"
                if isinstance(f, CategoricalFeature):
                    self.categorical[key] = nn.Embedding(f.cardinality, tasks)
                    nn.init.zeros_(self.categorical[key].weight)
                elif isinstance(f, MultiCategoricalFeature):
                    self.multi[key] = nn.EmbeddingBag(f.cardinality, tasks, mode=f.pooling, include_last_offset=True)
                    nn.init.zeros_(self.multi[key].weight)
                elif isinstance(f, NumericFeature):
                    self.numeric[key] = nn.Parameter(torch.zeros(tasks))

    def forward(self, groups: dict[str, FeatureTensors], n: int) -> Tensor:
        logit = self.bias.expand(n, -1)
        for group, features in self.spec.feature_groups.items():
            ft = groups[group]
            for f in features:
                key = f"{group}__{f.name}"
                if key in self.categorical:
                    logit = logit + self.categorical[key](ft.categorical[f.name])
                elif key in self.multi:
                    values, offsets = ft.multi[f.name]
                    logit = logit + self.multi[key](values, offsets)
                else:
                    logit = logit + ft.numeric[f.name].float().unsqueeze(1) * self.numeric[key]
        return logit


class LogisticRegression(nn.Module):
    """Per-scenario, per-task logistic regression over the scenario's own features."""

    def __init__(self, schema: DataSchema, config: LogisticConfig | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.config = config or LogisticConfig()
        self.scenarios = nn.ModuleDict({s.name: _ScenarioLR(s) for s in schema.scenarios})

    def forward(self, batch: JaggedBatch) -> LogisticOutput:
        logits = {}
        for name, sb in batch.scenarios.items():
            if name not in self.scenarios:
                raise KeyError(f"batch has scenario {name!r}; this model was built for {list(self.scenarios)}")
            logits[name] = self.scenarios[name]({"user": sb.user, "cross": sb.cross, "item": sb.item}, sb.num_rows)
        return LogisticOutput(logits)

    def loss(self, batch: JaggedBatch, out: LogisticOutput) -> Tensor:
        """Sum over scenario x task of the mean BCE over observed labels (``task_mean``: the
        scenarios share no parameter, so the cross-scenario weighting does not matter here)."""
        return masked_bce_loss(self.schema, batch, out.logits, "task_mean")
