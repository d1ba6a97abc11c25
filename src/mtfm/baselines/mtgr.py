"""MTGR (Han et al. 2025, Meituan, "MTGR: Industrial-Scale Generative Recommendation Framework
in Meituan"), trained per scenario (the paper's group 2 of baselines, section 4.1.2).

MTGR's pieces, and where this library already has each:

* **user-level aggregation**: one sample per user and window, holding the user's sequences and
  all of their candidates (exposures), each candidate a token;
* **candidate tokens keep their cross features**: a candidate token is a projection of
  ``user features || cross features || item features`` (MTFM's T-token tokenizer, eq. 4);
* **HSTU** layers (SiLU pointwise attention with a gating branch) over the user's sequence
  tokens and candidate tokens: every token attends to every history token (bidirectional), to
  itself, and to the real-time tokens strictly before it (the dynamic mask below);
* **Group LayerNorm**: one LayerNorm per token group (each sequence type, the candidates);
* **dynamic mask**: a candidate sees the whole history, the real-time actions strictly before
  it (and still among the most recent ones, the serving view) and itself, never another
  candidate; so no label or later action leaks into a candidate's score.

MTFM generalises exactly this to several scenarios (paper section 3: "following MTGR"), so the
honest per-scenario MTGR is one MTFM-architecture network per scenario (``mtfm.model.mtfm.MTFM``
built on ``schema.restrict([s])``) with the HTA stack made of **full-attention layers only**
(``(0:P)x1``: ``target_layers_per_block = 0``, no target-only layers, which are MTFM's
addition). What is adapted to this data:

* scenario ``s``'s network reads ``restrict_batch(batch, [s])`` with only the users who have an
  exposure in ``s`` (:func:`~mtfm.model.batch_ops.select_users`): the same samples MTGR would be
  trained on from that scenario's log. The other users would change nothing (attention never
  crosses users) but cost a full pass over their sequences;
* the user's scenario features are concatenated into every candidate token with its cross and
  item features (MTFM's T-token, eq. 4), where MTGR gives the user profile tokens of its own;
  the information each candidate reads is the same;
* every network has its own embedding tables, tokenizers, layers and MMoE head, so nothing is
  shared between scenarios (the MMoE over one scenario's tasks stands in for MTGR's task heads);
* the last full layer is computed for candidate tokens only (``prune_last_full_layer``, exact);
* the loss is the same masked BCE per task as the other per-scenario baselines (``task_mean``).

Default size (``DEFAULT_NETWORK``): MTFM's small preset (``d_model`` 64, 2 heads, same
tokenizers and MMoE, and its attention additions: content match and the relative time bias, so
the HSTU baseline gets every attention improvement MTFM gets) with the stack ``(0:6)x1``, six
full-attention HSTU layers. Why six: on the 2,000-user synthetic world (batch 64 users, 1 CPU
thread, CPU time per fwd+bwd+Adam step, same batches interleaved) MTFM small costs 1.0x,
``(0:2)x1`` 0.90x, ``(0:4)x1`` 1.45x, ``(0:6)x1`` 1.89x, ``(0:8)x1`` 2.45x: every full layer adds
about a quarter of an MTFM-small step. Six layers keep a step under 2x MTFM small; a candidate
then passes 6 layers and a sequence token 5 (the last one is pruned), where MTFM small gives a
candidate 8 layers (6 of them target-only) and a sequence token 1.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtfm.baselines.common import BaselineOutput, PerScenario
from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch
from mtfm.model.batch_ops import restrict_batch, select_users
from mtfm.model.config import ModelConfig, load_model_config
from mtfm.model.mtfm import MTFM

__all__ = ["MTGR", "MTGRConfig", "BaselineOutput", "DEFAULT_NETWORK"]

# The small preset with full-attention layers only: (0:6)x1 (module docstring: why six).
DEFAULT_NETWORK: dict[str, object] = {"blocks": 1, "target_layers_per_block": 0, "full_layers_per_block": 6}


def _default_network() -> ModelConfig:
    return load_model_config("small").model_copy(update=DEFAULT_NETWORK)


class MTGRConfig(BaseModel):
    """The per-scenario network: a full :class:`~mtfm.model.config.ModelConfig` (stored whole, so a
    checkpoint rebuilds it without the presets). It must have no target-only layers.

    A ``network`` mapping that names only some fields (``{full_layers_per_block: 3}`` in a
    ``--model`` YAML) overrides the default network's fields, not ModelConfig's own defaults
    (which are MTFM's ``(3:1)x4`` stack, not MTGR's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    network: ModelConfig = Field(default_factory=_default_network,
                                 description="each scenario's MTFM-architecture network, full attention only")

    @model_validator(mode="before")
    @classmethod
    def _over_default_network(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("network"), dict):
            data = {**data, "network": {**_default_network().model_dump(mode="json"), **data["network"]}}
        return data

    @model_validator(mode="after")
    def _full_attention_only(self) -> "MTGRConfig":
        if self.network.target_layers_per_block != 0:
            raise ValueError(f"MTGR uses full-attention layers only: network.target_layers_per_block must be 0, "
                             f"got {self.network.target_layers_per_block} (stack {self.network.hta})")
        return self


class ScenarioMTGR(nn.Module):
    """One scenario's network; ``forward(batch)`` takes a batch of any scenarios and returns this
    scenario's ``[n_s, num_tasks]`` logits, rows aligned with ``batch.scenarios[s]``."""

    def __init__(self, schema: DataSchema, scenario: str, config: MTGRConfig) -> None:
        super().__init__()
        self.scenario = scenario
        self.num_tasks = len(schema.scenario(scenario).tasks)
        self.net = MTFM(schema.restrict([scenario]), config.network)

    def forward(self, batch: JaggedBatch) -> Tensor:
        own = restrict_batch(batch, [self.scenario])
        sc = own.scenarios[self.scenario]
        counts = sc.offsets[1:] - sc.offsets[:-1]
        users = torch.nonzero(counts > 0).flatten()
        if users.numel() == 0:
            weight = next(self.net.parameters())
            return weight.new_zeros((0, self.num_tasks))
        if users.numel() < own.batch_size:
            own = select_users(own, users)  # keeps each user's rows in order: rows stay aligned
        return self.net(own).logits[self.scenario]


class MTGR(PerScenario):
    """MTGR per scenario: ``model(batch).logits[s]`` ``[n_s, num_tasks]``; ``model.loss(batch, out)``."""

    def __init__(self, schema: DataSchema, config: MTGRConfig | None = None) -> None:
        cfg = config or MTGRConfig()
        super().__init__(schema, lambda sch, name: ScenarioMTGR(sch, name, cfg))
        self.config = cfg
