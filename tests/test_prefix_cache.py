"""The per-user prefix cache: hits, version and TTL misses, invalidation, the memory bound (LRU),
and a cached prefix scoring a request exactly as a fresh one."""

from __future__ import annotations

import pytest
import torch

from mtfm.model import MTFM
from mtfm.model.batch_ops import restrict_batch
from mtfm.model.testing import BatchShape, random_batch, tiny_config, tiny_schema
from mtfm.serve.falcon import UserPrefix, compute_prefix, score_candidates
from mtfm.serve.prefix_cache import PrefixCache


def _prefix(tokens: int) -> UserPrefix:
    kv = [(torch.zeros(tokens, 1, 4), torch.zeros(tokens, 1, 4))]  # 2 * tokens * 16 bytes
    z = torch.zeros(tokens, dtype=torch.long)
    return UserPrefix(kv, z, z, z)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hits_misses_versions_ttl_and_invalidation():
    clock = Clock()
    cache = PrefixCache(max_bytes=10_000, ttl_s=60, clock=clock)
    assert cache.get(1, "v1") is None
    p = _prefix(3)
    cache.put(1, "v1", p)
    assert cache.get(1, "v1") is p
    assert cache.get(1, "v2") is None and len(cache) == 0  # another version: stale, dropped
    cache.put(1, "v2", p)
    clock.now = 61
    assert cache.get(1, "v2") is None  # expired
    cache.put(1, "v3", p)
    assert cache.invalidate(1) and not cache.invalidate(1)
    assert cache.get(1, "v3") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stale) == (1, 4, 2)
    assert cache.stats.hit_rate == pytest.approx(1 / 5)


def test_the_memory_bound_evicts_the_least_recently_used():
    size = _prefix(10).nbytes
    cache = PrefixCache(max_bytes=3 * size, ttl_s=60)
    for user in range(3):
        cache.put(user, 0, _prefix(10))
    cache.get(0, 0)  # user 0 becomes the most recent; user 1 the least
    cache.put(3, 0, _prefix(10))
    assert cache.get(1, 0) is None and cache.get(0, 0) is not None and cache.get(3, 0) is not None
    assert cache.nbytes == 3 * size and cache.stats.evictions == 1
    cache.put(9, 0, _prefix(1000))  # larger than the whole bound: not stored, nothing evicted
    assert cache.get(9, 0) is None and len(cache) == 3
    with pytest.raises(ValueError, match="must be > 0"):
        PrefixCache(0, 1)


def test_a_cached_prefix_scores_later_requests_as_a_fresh_one():
    schema = tiny_schema()
    scenario = schema.scenario_names[0]
    torch.manual_seed(0)
    model = MTFM(schema, tiny_config()).eval()
    batch = restrict_batch(random_batch(schema, 1, seed=4, shape=BatchShape(exposures=6),
                                        lengths={scenario: [6]}), [scenario])
    cache = PrefixCache(max_bytes=1 << 24, ttl_s=60)
    version = ("window", int(batch.window_start[0]), "behaviour", 17)
    cache.put(7, version, compute_prefix(model, batch))
    cached = score_candidates(model, batch, cache.get(7, version), micro_batch=2)[scenario]
    with torch.no_grad():
        torch.testing.assert_close(cached, model(batch).logits[scenario], atol=1e-5, rtol=1e-5)
