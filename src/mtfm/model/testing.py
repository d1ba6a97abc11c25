"""Small schemas and random JaggedBatches for tests and benchmarks of the model.

:func:`tiny_schema` has two history types, one real-time type and three scenarios whose
feature lists differ (categorical, numeric and list-valued features; a scenario without user
or cross features; an id feature shared by name with the sequences). :func:`random_batch`
draws batches for any schema that respect the data layer's timing invariants: history
actions are strictly before the user's window start, exposures lie inside the window, and
real-time actions lie anywhere before the window end (so some are at or after exposures, the
case the dynamic mask must hide), each with its expiry (the real-time ``max_len`` of the tiny
schema is below the drawn lengths, so tokens see different real-time views).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtfm.config import (
    CategoricalFeature,
    DataSchema,
    Feature,
    MultiCategoricalFeature,
    NumericFeature,
    schema_from_dict,
)
from mtfm.data.batch import (
    FeatureTensors,
    JaggedBatch,
    ScenarioBatch,
    SequenceBatch,
    build_token_layout,
    realtime_expiry,
)
from mtfm.model.config import ModelConfig


def tiny_config(**overrides: object) -> ModelConfig:
    """A model small enough for property tests on two CPU cores: (1:1)x2, d_model 16, H 2, G 1."""
    base: dict[str, object] = dict(
        d_model=16, num_heads=2, num_kv_groups=1, blocks=2, target_layers_per_block=1, full_layers_per_block=1,
        embedding_dim=4, numeric_dim=2, tokenizer_hidden=[16], mmoe_num_experts=2, mmoe_expert_hidden=[16],
        mmoe_expert_dim=8, mmoe_tower_hidden=[8], attention_norm_len=16,
    )
    base.update(overrides)
    return ModelConfig(**base)


def tiny_schema() -> DataSchema:
    """A three-scenario schema with distinct feature lists per scenario (alignment-free); ``item_id``
    and ``tags`` declare one shared table each (the sequences' and the scenarios')."""
    item = {"name": "item_id", "kind": "categorical", "num_embeddings": 50, "share": "item_id"}
    tags = {"name": "tags", "kind": "multi_categorical", "num_embeddings": 7, "max_len": 3, "share": "tags"}
    return schema_from_dict(
        {
            "window": 100,
            "split": {"valid_fraction": 0.1, "test_fraction": 0.1},
            "history": [
                {"name": "orders", "table": "orders", "max_len": 20,
                 "features": [item, {"name": "shop", "kind": "categorical", "hash_buckets": 13}]},
                {"name": "clicks", "table": "clicks", "max_len": 20,
                 "features": [item, {"name": "dwell", "kind": "numeric"}]},
            ],
            "realtime": [
                {"name": "recent", "table": "recent", "max_len": 2,  # below BatchShape.realtime: views differ per token
                 "features": [item, tags]},
            ],
            "scenarios": [
                {"name": "feed", "table": "feed",
                 "user_features": [{"name": "age", "kind": "categorical", "vocabulary": ["a", "b", "c"]}],
                 "cross_features": [{"name": "distance", "kind": "numeric"}],
                 "item_features": [item, tags],
                 "tasks": [{"name": "ctr", "labels": ["click"]}, {"name": "ctcvr", "labels": ["click", "order"]}]},
                {"name": "food", "table": "food",
                 "item_features": [item, {"name": "dish_type", "kind": "categorical", "num_embeddings": 5, "embedding_dim": 4},
                                   {"name": "price", "kind": "numeric"}],
                 "tasks": [{"name": "ctr", "labels": ["click"]}]},
                {"name": "coupon", "table": "coupon",
                 "user_features": [{"name": "vip", "kind": "categorical", "num_embeddings": 2}],
                 "item_features": [{"name": "brand", "kind": "categorical", "hash_buckets": 11},
                                   {"name": "discount", "kind": "numeric"}],
                 "tasks": [{"name": "ctr", "labels": ["click"]},
                           {"name": "ctcvr", "labels": ["click", "buy"], "allow_missing": True}]},
            ],
        },
        "<tiny_schema>",
    )


@dataclass(frozen=True)
class BatchShape:
    """Upper bounds (inclusive) of the random lengths per user."""

    history: int = 6
    realtime: int = 4
    exposures: int = 3
    history_span: int = 300  # history actions lie in [window_start - history_span, window_start)
    realtime_lead: int = 50  # real-time actions lie in [window_start - realtime_lead, window_end)


def _features(features: list[Feature], n: int, g: torch.Generator) -> FeatureTensors:
    out = FeatureTensors()
    for f in features:
        if isinstance(f, NumericFeature):
            out.numeric[f.name] = torch.randn(n, generator=g)
        elif isinstance(f, MultiCategoricalFeature):
            lengths = torch.randint(0, f.max_len + 1, (n,), generator=g)
            offsets = torch.zeros(n + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(lengths, 0)
            out.multi[f.name] = (torch.randint(0, f.cardinality, (int(offsets[-1]),), generator=g), offsets)
        else:
            assert isinstance(f, CategoricalFeature)
            out.categorical[f.name] = torch.randint(0, f.cardinality, (n,), generator=g)
    return out


def _offsets(lengths: list[int]) -> Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    return offsets


def _sorted_times(lengths: list[int], low: Tensor, high: Tensor, g: torch.Generator) -> Tensor:
    """Per user ``b``: ``lengths[b]`` sorted integer times in ``[low[b], high[b])``."""
    parts = []
    for b, n in enumerate(lengths):
        parts.append(torch.sort(torch.randint(int(low[b]), int(high[b]), (n,), generator=g)).values)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def random_batch(
    schema: DataSchema,
    batch_size: int,
    seed: int = 0,
    shape: BatchShape = BatchShape(),
    lengths: dict[str, list[int]] | None = None,
) -> JaggedBatch:
    """A random batch for ``schema``; every user has at least one exposure.

    ``lengths`` may fix the per-user row counts of any sequence type or scenario (by name).
    """
    g = torch.Generator().manual_seed(seed)
    fixed = lengths or {}
    window_start = torch.randint(0, 50, (batch_size,), generator=g) * schema.window + 10_000
    window_end = window_start + schema.window

    def draw(name: str, high: int) -> list[int]:
        if name in fixed:
            if len(fixed[name]) != batch_size:
                raise ValueError(f"lengths[{name!r}] has {len(fixed[name])} entries for {batch_size} users")
            return list(fixed[name])
        return torch.randint(0, high + 1, (batch_size,), generator=g).tolist()

    history = {}
    for spec in schema.history:
        n = draw(spec.name, shape.history)
        ts = _sorted_times(n, window_start - shape.history_span, window_start, g)
        history[spec.name] = SequenceBatch(_offsets(n), ts, _features(list(spec.features), sum(n), g))
    realtime = {}
    for spec in schema.realtime:
        n = draw(spec.name, shape.realtime)
        ts = _sorted_times(n, window_start - shape.realtime_lead, window_end, g)
        offsets = _offsets(n)
        realtime[spec.name] = SequenceBatch(offsets, ts, _features(list(spec.features), sum(n), g),
                                            realtime_expiry(offsets, ts, spec.max_len))

    counts = {sc.name: draw(sc.name, shape.exposures) for sc in schema.scenarios}
    first = schema.scenarios[0].name
    for b in range(batch_size):  # every user has at least one exposure (as in the data layer)
        if sum(counts[s][b] for s in counts) == 0 and first not in fixed:
            counts[first][b] = 1
    scenarios = {}
    for sc in schema.scenarios:
        n = counts[sc.name]
        rows, tasks = sum(n), len(sc.tasks)
        labels = torch.randint(0, 2, (rows, tasks), generator=g).float()
        mask = torch.ones(rows, tasks, dtype=torch.bool)
        for j, task in enumerate(sc.tasks):
            if task.allow_missing:
                mask[:, j] = torch.rand(rows, generator=g) < 0.7
        scenarios[sc.name] = ScenarioBatch(
            offsets=_offsets(n),
            timestamps=_sorted_times(n, window_start, window_end, g),
            user=_features(list(sc.user_features), rows, g),
            cross=_features(list(sc.cross_features), rows, g),
            item=_features(list(sc.item_features), rows, g),
            labels=labels * mask,
            label_mask=mask,
            oracle=torch.full((rows, tasks), float("nan")),
        )
    layout = build_token_layout(history, realtime, scenarios, batch_size)
    return JaggedBatch(torch.arange(batch_size), window_start, history, realtime, scenarios, layout)
