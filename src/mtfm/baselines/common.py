"""What the neural baselines share: one output type, one input encoder, the visibility rule.

Every baseline takes the same :class:`~mtfm.data.batch.JaggedBatch` as MTFM and returns
:class:`BaselineOutput` (``logits[s]``: ``[n_s, num_tasks_s]``, rows aligned with
``batch.scenarios[s]``, schema task order), trained by the same trainer with the same loss
(:func:`mtfm.model.loss.masked_bce_loss`).

**Behaviour sequences for non-sequence models.** A model without attention over tokens still
gets the user's behaviour: each exposure pools the history (H) and real-time (R) rows *it is
allowed to see*, under exactly MTFM's dynamic-mask rule (:mod:`mtfm.model.mask`): every H row,
and an R row only when ``t_k < t_q <= expiry_k`` (strictly earlier than the exposure and still
among the ``max_len`` most recent of its type). So no baseline reads an action at or after its
exposure (the leakage tests hold for baselines too), and a baseline sees exactly the
behaviour MTFM sees. Pooling, per sequence type (:class:`SequencePooling`):

* ``mean``: the mean of the visible rows' projected feature embeddings (YouTube-DNN style);
* ``target`` (default): that mean plus a target-attention pooled vector (DIN-style: the
  exposure's item embedding as the query, softmax over the visible rows' keys, scaled dot
  product), the way industrial versions of these models read sequences;

each followed by ``log(1 + number of visible rows)``, so "how much recent activity" is a
feature too.

**Per-scenario models** (the paper's groups 1 and 2 are trained per scenario): a
:class:`PerScenario` model holds one independent sub-model per scenario, each with its own
embedding tables, and sums their losses. Nothing is shared, so with Adam's per-parameter steps
this is training one model per scenario, except that all of them see the same batches and the
same gradient-norm clip, and model selection picks one epoch for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtfm.config import DataSchema
from mtfm.data.batch import JaggedBatch, ScenarioBatch, SequenceBatch, ranges_to_rows
from mtfm.model.embedding import FeatureEmbeddings
from mtfm.model.loss import masked_bce_loss
from mtfm.model.mtfm import embedding_fields

HistoryPooling = Literal["mean", "target"]
SCENARIO_PARTS = ("user", "cross", "item")


@dataclass
class BaselineOutput:
    logits: dict[str, Tensor]  # scenario -> [n_s, num_tasks]


class InputConfig(BaseModel):
    """How a baseline encodes its inputs (the widths default to MTFM's small preset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_dim: int = Field(16, ge=1, description="width of each categorical feature's embedding")
    numeric_dim: int = Field(4, ge=1, description="width of each numeric feature's linear encoder")
    sequence_dim: int = Field(32, ge=1, description="width of a pooled behaviour-sequence vector")
    history_pooling: HistoryPooling = "target"


def row_samples(offsets: Tensor) -> Tensor:
    """Sample (user) index of every row of a jagged field, from its ``offsets`` [B + 1]."""
    counts = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], dtype=torch.long, device=offsets.device), counts)


def visible_pairs(scenario: ScenarioBatch, seq: SequenceBatch, realtime: bool) -> tuple[Tensor, Tensor]:
    """``(exposure rows, sequence rows)`` of every pair where the exposure may see the sequence row.

    Pairs are only formed within one sample (user). History rows are always visible; a
    real-time row only when ``t_k < t_q <= expiry_k`` (:func:`mtfm.model.mask.visible`).
    """
    users = row_samples(scenario.offsets)
    counts_offsets, keys = ranges_to_rows(seq.offsets[users], seq.offsets[users + 1])
    queries = torch.repeat_interleave(torch.arange(users.shape[0], device=users.device),
                                      counts_offsets[1:] - counts_offsets[:-1])
    if realtime:
        if seq.expiry is None:
            raise ValueError("a real-time sequence batch must carry expiry (the loader computes it)")
        t_q = scenario.timestamps[queries]
        keep = (seq.timestamps[keys] < t_q) & (t_q <= seq.expiry[keys])
        queries, keys = queries[keep], keys[keep]
    return queries, keys


def segment_softmax(scores: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Softmax of ``scores`` within each segment (``segment[i]``: which one score ``i`` is in)."""
    if scores.numel() == 0:
        return scores
    top = torch.full((num_segments,), -math.inf, dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, segment, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - top[segment])
    total = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device).index_add(0, segment, e)
    return e / total[segment]


class SequencePooling(nn.Module):
    """Each exposure's visible H and R rows pooled into ``out_dim`` features (see module doc).

    ``query_dims[s]`` is the width of scenario ``s``'s query vector (target pooling only).
    """

    def __init__(self, schema: DataSchema, embeddings: FeatureEmbeddings, query_dims: dict[str, int],
                 dim: int, mode: HistoryPooling) -> None:
        super().__init__()
        self.types = [(f"H:{s.name}", s.name, False) for s in schema.history]
        self.types += [(f"R:{s.name}", s.name, True) for s in schema.realtime]
        self.embeddings, self.dim, self.mode = embeddings, dim, mode
        self.keys = nn.ModuleDict({_key(field): nn.Linear(embeddings.out_dim(field), dim) for field, _, _ in self.types})
        self.queries = nn.ModuleDict()
        if mode == "target":
            for s, qdim in query_dims.items():
                for field, _, _ in self.types:
                    self.queries[_key(f"{s}|{field}")] = nn.Linear(qdim, dim)
        per_type = dim * (2 if mode == "target" else 1) + 1
        self.out_dim = per_type * len(self.types)

    def encode_sequences(self, batch: JaggedBatch) -> dict[str, Tensor]:
        """Projected rows of every sequence type (once per batch, shared by all scenarios)."""
        out = {}
        for field, name, realtime in self.types:
            seq = (batch.realtime if realtime else batch.history)[name]
            out[field] = self.keys[_key(field)](self.embeddings.embed(field, seq.features, seq.num_rows))
        return out

    def forward(self, batch: JaggedBatch, scenario: str, query: Tensor | None,
                encoded: dict[str, Tensor]) -> Tensor:
        """``[n_s, out_dim]`` for scenario ``scenario``'s exposures (``encoded``: :meth:`encode_sequences`)."""
        sc = batch.scenarios[scenario]
        n = sc.num_rows
        parts: list[Tensor] = []
        for field, name, realtime in self.types:
            seq = (batch.realtime if realtime else batch.history)[name]
            q_rows, k_rows = visible_pairs(sc, seq, realtime)
            keys = encoded[field].index_select(0, k_rows)
            count = torch.zeros(n, dtype=keys.dtype, device=keys.device).index_add(
                0, q_rows, torch.ones_like(q_rows, dtype=keys.dtype))
            total = keys.new_zeros((n, self.dim)).index_add(0, q_rows, keys)
            parts.append(total / count.clamp(min=1.0)[:, None])
            if self.mode == "target":
                if query is None:
                    raise ValueError("target pooling needs the exposures' query vectors")
                q = self.queries[_key(f"{scenario}|{field}")](query)
                scores = (q.index_select(0, q_rows) * keys).sum(1) / math.sqrt(self.dim)
                weights = segment_softmax(scores, q_rows, n)
                parts.append(keys.new_zeros((n, self.dim)).index_add(0, q_rows, weights[:, None] * keys))
            parts.append(torch.log1p(count)[:, None])
        return torch.cat(parts, dim=1) if parts else query.new_zeros((n, 0))


def _key(name: str) -> str:
    return name.replace(":", "__").replace("|", "___").replace(".", "_")


class ScenarioInputs(nn.Module):
    """One scenario's exposures as the vectors a non-sequence model reads.

    Its own feature tables (user, cross and item features of this scenario, and the behaviour
    sequences' features), so a per-scenario model shares nothing with another scenario's.
    :meth:`forward` returns the named parts ``user``, ``cross``, ``item`` (each the
    concatenation of that part's feature embeddings; parts without features left out) and
    ``sequences`` (:class:`SequencePooling`, when the schema has sequences); :attr:`part_dims`
    gives their widths. The pooling query is the item part (the candidate), as in DIN.
    """

    def __init__(self, schema: DataSchema, scenario: str, config: InputConfig) -> None:
        super().__init__()
        self.scenario = scenario
        fields = {f: feats for f, feats in embedding_fields(schema).items()
                  if f.startswith(("H:", "R:")) or f.startswith(f"T:{scenario}:")}
        self.embeddings = FeatureEmbeddings(fields, config.embedding_dim, config.numeric_dim)
        self.t_fields = {p: f"T:{scenario}:{p}" for p in SCENARIO_PARTS if f"T:{scenario}:{p}" in fields}
        self.part_dims = {p: self.embeddings.out_dim(f) for p, f in self.t_fields.items()}
        self.pooling: SequencePooling | None = None
        if schema.history or schema.realtime:
            self.pooling = SequencePooling(schema, self.embeddings, {scenario: self.part_dims["item"]},
                                           config.sequence_dim, config.history_pooling)
            self.part_dims["sequences"] = self.pooling.out_dim

    @property
    def out_dim(self) -> int:
        return sum(self.part_dims.values())

    def forward(self, batch: JaggedBatch) -> dict[str, Tensor]:
        sc = batch.scenarios[self.scenario]
        parts = {p: self.embeddings.embed(f, getattr(sc, p), sc.num_rows) for p, f in self.t_fields.items()}
        if self.pooling is not None:
            encoded = self.pooling.encode_sequences(batch)
            parts["sequences"] = self.pooling(batch, self.scenario, parts["item"], encoded)
        return parts


class PerScenario(nn.Module):
    """One independent sub-model per scenario (the paper's per-scenario baselines).

    ``build(schema, scenario)`` returns a module whose ``forward(batch)`` gives that scenario's
    ``[n_s, num_tasks]`` logits. The loss is the same ``task_mean`` BCE as the logistic
    baseline: with no shared parameter, the weighting between scenarios only scales each
    sub-model's gradient, which Adam normalises away.
    """

    def __init__(self, schema: DataSchema, build: Callable[[DataSchema, str], nn.Module]) -> None:
        super().__init__()
        self.schema = schema
        self.scenarios = nn.ModuleDict({s.name: build(schema, s.name) for s in schema.scenarios})

    def forward(self, batch: JaggedBatch) -> BaselineOutput:
        logits = {}
        for name in batch.scenarios:
            if name not in self.scenarios:
                raise KeyError(f"batch has scenario {name!r}; this model was built for {list(self.scenarios)}")
            out = self.scenarios[name](batch)
            logits[name] = out if out.dtype == torch.float64 else out.float()  # bf16 -> fp32; fp64 kept (tests)
        return BaselineOutput(logits)

    def loss(self, batch: JaggedBatch, out: BaselineOutput) -> Tensor:
        return masked_bce_loss(self.schema, batch, out.logits, "task_mean")


def mlp(in_dim: int, hidden: list[int], dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> ReLU (-> Dropout)`` per hidden width; the output width is ``hidden[-1]`` (or ``in_dim``)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)
