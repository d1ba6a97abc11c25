"""Small real pieces for the trainer tests: a schema, hand-built JaggedBatches with a
learnable signal, an in-memory batch source with the loader's interface, and a tiny ranking
model with the MTFM interface (``model(batch).logits`` + ``model.loss``), including dropout so
that exact resume has RNG state to get right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtfm.config import DataSchema, schema_from_dict
from mtfm.data.batch import FeatureTensors, JaggedBatch, ScenarioBatch, SequenceBatch, build_token_layout

NUM_ITEMS = 50


def tiny_schema() -> DataSchema:
    """Two scenarios with different features (one big, one small) and one history type."""
    return schema_from_dict({
        "window": 86400,
        "split": {"valid_fraction": 0.2, "test_fraction": 0.2},
        "scenarios": [
            {"name": "BIG", "table": "big",
             "user_features": [{"kind": "categorical", "name": "age", "num_embeddings": 5}],
             "item_features": [{"kind": "categorical", "name": "item", "num_embeddings": NUM_ITEMS},
                               {"kind": "numeric", "name": "price"},
                               {"kind": "multi_categorical", "name": "tags", "num_embeddings": 8}],
             "tasks": [{"name": "ctr", "labels": ["click"], "oracle_column": "p_click"},
                       {"name": "ctcvr", "labels": ["click", "buy"], "allow_missing": True}]},
            {"name": "SMALL", "table": "small",
             "cross_features": [{"kind": "numeric", "name": "past_ctr"}],
             "item_features": [{"kind": "categorical", "name": "item", "num_embeddings": NUM_ITEMS}],
             "tasks": [{"name": "ctr", "labels": ["click"], "oracle_column": "p_click"}]},
        ],
        "history": [{"name": "clicks", "table": "clicks",
                     "features": [{"kind": "categorical", "name": "item", "num_embeddings": NUM_ITEMS}], "max_len": 8}],
    })


def _ids(offsets: list[int]) -> Tensor:
    return torch.tensor(offsets, dtype=torch.long)


def make_batch(schema: DataSchema, seed: int, batch_size: int = 8, first_user: int = 0) -> JaggedBatch:
    """A random batch whose click probability depends on the item and the user's history."""
    rng = np.random.default_rng(seed)
    item_score = np.random.default_rng(1234).normal(0, 1.5, NUM_ITEMS)  # the world's fixed truth
    users = np.arange(first_user, first_user + batch_size)
    hist_len = rng.integers(0, 5, batch_size)
    hist_items = rng.integers(0, NUM_ITEMS, hist_len.sum())
    hist_offsets = np.r_[0, np.cumsum(hist_len)]
    history = {"clicks": SequenceBatch(_ids(hist_offsets.tolist()), torch.tensor(rng.integers(0, 100, hist_len.sum())),
                                       FeatureTensors(categorical={"item": torch.tensor(hist_items)}))}
    user_taste = np.array([item_score[hist_items[a:b]].mean() if b > a else 0.0
                           for a, b in zip(hist_offsets[:-1], hist_offsets[1:])])
    scenarios = {}
    for spec, max_n in zip(schema.scenarios, (5, 2)):
        n_per = rng.integers(0, max_n + 1, batch_size)
        n = int(n_per.sum())
        item = rng.integers(0, NUM_ITEMS, n)
        owner = np.repeat(np.arange(batch_size), n_per)
        p = 1 / (1 + np.exp(-(item_score[item] + 0.8 * user_taste[owner] - 0.5)))
        click = (rng.random(n) < p).astype(np.float32)
        cats = {"item": torch.tensor(item)}
        numeric, multi, user_f, cross_f = {}, {}, FeatureTensors(), FeatureTensors()
        if spec.name == "BIG":
            numeric = {"price": torch.tensor(rng.normal(0, 1, n), dtype=torch.float32)}
            tag_len = rng.integers(0, 3, n)
            multi = {"tags": (torch.tensor(rng.integers(0, 8, tag_len.sum())), _ids(np.r_[0, np.cumsum(tag_len)].tolist()))}
            user_f = FeatureTensors(categorical={"age": torch.tensor(rng.integers(0, 5, n))})
        else:
            cross_f = FeatureTensors(numeric={"past_ctr": torch.tensor(rng.random(n), dtype=torch.float32)})
        tasks = len(spec.tasks)
        labels = np.stack([click, click * (rng.random(n) < 0.5)][:tasks], 1).astype(np.float32)
        mask = np.ones((n, tasks), dtype=bool)
        if tasks > 1:
            mask[:, 1] = rng.random(n) < 0.9
        oracle = np.full((n, tasks), np.nan, dtype=np.float32)
        oracle[:, 0] = p
        scenarios[spec.name] = ScenarioBatch(
            offsets=_ids(np.r_[0, np.cumsum(n_per)].tolist()), timestamps=torch.tensor(rng.integers(100, 200, n)),
            user=user_f, cross=cross_f, item=FeatureTensors(categorical=cats, numeric=numeric, multi=multi),
            labels=torch.tensor(labels), label_mask=torch.tensor(mask), oracle=torch.tensor(oracle))
    layout = build_token_layout(history, {}, scenarios, batch_size)
    return JaggedBatch(user_ids=torch.tensor(users), window_start=torch.zeros(batch_size, dtype=torch.long),
                       history=history, realtime={}, scenarios=scenarios, layout=layout)


class MemoryBatches:
    """The loader's interface over pre-built batches: deterministic shuffle per (seed, epoch),
    batches dealt round-robin to ranks (so ranks can hold unequal counts)."""

    def __init__(self, batches: list[JaggedBatch], *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.batches = [b for i, b in enumerate(batches) if i % world_size == rank]
        self.shuffle, self.seed = shuffle, seed

    def num_batches(self, epoch: int) -> int:
        return len(self.batches)

    def iterate(self, epoch: int, start_batch: int = 0):
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(order)
        for i in order[start_batch:]:
            yield self.batches[i]


def make_split(schema: DataSchema, n_batches: int, seed: int, batch_size: int = 8) -> list[JaggedBatch]:
    return [make_batch(schema, seed * 100_000 + i, batch_size, first_user=i * batch_size) for i in range(n_batches)]


@dataclass
class TinyOutput:
    logits: dict[str, Tensor]


class TinyRanker(nn.Module):
    """Item embedding + mean history embedding + dropout + per-scenario linear heads."""

    def __init__(self, schema: DataSchema, dim: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        self.item = nn.Embedding(NUM_ITEMS, dim)
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({s.name: nn.Linear(2 * dim, len(s.tasks)) for s in schema.scenarios})

    def forward(self, batch: JaggedBatch) -> TinyOutput:
        h = batch.history["clicks"]
        counts = (h.offsets[1:] - h.offsets[:-1]).clamp(min=1).unsqueeze(1).float()
        owner = torch.repeat_interleave(torch.arange(batch.batch_size, device=h.offsets.device), h.offsets[1:] - h.offsets[:-1])
        pooled = torch.zeros(batch.batch_size, self.item.embedding_dim, device=h.offsets.device)
        pooled = pooled.index_add(0, owner, self.item(h.features.categorical["item"])) / counts
        logits = {}
        for name, sb in batch.scenarios.items():
            rows = torch.repeat_interleave(torch.arange(batch.batch_size, device=sb.offsets.device), sb.offsets[1:] - sb.offsets[:-1])
            x = torch.cat([self.item(sb.item.categorical["item"]), pooled[rows]], 1)
            logits[name] = self.heads[name](self.drop(x))
        return TinyOutput(logits)

    def loss(self, batch: JaggedBatch, out: TinyOutput) -> Tensor:
        total = torch.zeros(())
        for name, sb in batch.scenarios.items():
            m = sb.label_mask
            if m.any():
                total = total + F.binary_cross_entropy_with_logits(out.logits[name][m], sb.labels[m])
        return total


# --------------------------------------------------------------------------------------------
# Real pieces: a prepared synthetic world and a tiny MTFM config (for CLI / end-to-end tests)
# --------------------------------------------------------------------------------------------

TINY_MTFM = {
    "d_model": 16, "num_heads": 2, "num_kv_groups": 1, "blocks": 1, "target_layers_per_block": 1,
    "full_layers_per_block": 1, "dropout": 0.1, "embedding_dim": 4, "numeric_dim": 2, "tokenizer_hidden": [16],
    "mmoe_num_experts": 2, "mmoe_expert_hidden": [16], "mmoe_expert_dim": 8, "mmoe_tower_hidden": [8],
}


def write_tiny_model_yaml(path) -> str:
    import yaml

    path.write_text(yaml.safe_dump(TINY_MTFM))
    return str(path)


def prepare_synthetic(out, users: int = 150, seed: int = 0, shards: int = 1) -> str:
    """A small prepared synthetic world (train / valid / test, oracle known)."""
    from mtfm.data.aggregate import prepare
    from mtfm.data.sources.synthetic import load_source

    prepare(load_source(None, None, users, seed), out, shards=shards)
    return str(out)
