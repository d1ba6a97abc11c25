"""The multi-scenario, multi-task training loss shared by MTFM and the baselines.

Every model's ``loss(batch, out)`` is the sum over (scenario, task) of the binary
cross-entropy over that task's *observed* labels (``label_mask``), so a label the data marks
missing never contributes, whatever its stored value. How the terms are normalised is the
one choice, :data:`LossWeighting`:

* ``exposure``: each term is the task's summed BCE divided by the batch's exposures of all
  scenarios, so every labelled exposure weighs the same (one joint likelihood): a scenario
  with 1/8 of the exposures steers shared parameters with 1/8 of the weight.
* ``task_mean``: each term is the task's mean BCE, so every (scenario, task) weighs the same
  whatever its exposure count. On the synthetic world this let the small scenario's few noisy
  labels dominate MTFM's shared layers (benchmarks/results/train.md). For a model without
  shared parameters (the logistic baseline) the two differ only by a per-batch scale.

The sum (not the mean) over tasks keeps each task's gradient scale independent of how many
tasks a batch holds. Both weightings agree on a single-scenario batch with every label seen.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch

LossWeighting = Literal["exposure", "task_mean"]


def masked_bce_terms(schema: DataSchema, batch: JaggedBatch, logits: dict[str, Tensor],
                     weighting: LossWeighting) -> dict[str, Tensor]:
    """``"scenario/task"`` -> that task's normalised BCE term; tasks without an observed label are absent."""
    by_exposure = weighting == "exposure"
    exposures = sum(s.num_rows for s in batch.scenarios.values())
    terms: dict[str, Tensor] = {}
    for name, scenario in batch.scenarios.items():
        tasks = schema.scenario(name).task_names
        scores = logits[name]
        if scenario.labels.shape != scores.shape or scenario.label_mask.shape != scores.shape:
            raise ValueError(
                f"scenario {name!r}: labels {tuple(scenario.labels.shape)} / label_mask "
                f"{tuple(scenario.label_mask.shape)} do not match logits {tuple(scores.shape)} "
                f"(rows x tasks {tasks})"
            )
        for j, task in enumerate(tasks):
            observed = scenario.label_mask[:, j].bool()
            if bool(observed.any()):
                bce = F.binary_cross_entropy_with_logits(
                    scores[observed, j].float(), scenario.labels[observed, j].float(),
                    reduction="sum" if by_exposure else "mean",
                )
                terms[f"{name}/{task}"] = bce / exposures if by_exposure else bce
    return terms


def masked_bce_loss(schema: DataSchema, batch: JaggedBatch, logits: dict[str, Tensor],
                    weighting: LossWeighting) -> Tensor:
    """Sum of :func:`masked_bce_terms`.

    A batch without any observed label gives a zero that is still connected to the graph
    (backward runs, every gradient is zero), so every DDP rank runs the same backward.
    """
    terms = masked_bce_terms(schema, batch, logits, weighting)
    if terms:
        return torch.stack(list(terms.values())).sum()
    if logits:
        return torch.stack([t.sum() for t in logits.values()]).sum() * 0.0
    return torch.zeros((), device=batch.user_ids.device)
