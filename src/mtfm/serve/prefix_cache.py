"""A per-user cache of M-Falcon prefixes across requests: LRU under a memory bound, with a TTL.

A user's prefix (:class:`mtfm.serve.falcon.UserPrefix`) depends on the request's window and on
the behaviour rows the request read; nothing about the candidates. So an entry is keyed by user
and stamped with a ``version`` the caller derives from exactly those inputs (for example the
window id and the user's behaviour sequence number in the behaviour store). A lookup with
another version is a miss and drops the stale entry; :meth:`PrefixCache.invalidate` drops a
user's entry at once (call it when the user's behaviour changes). Entries older than ``ttl_s``
are misses too, and the least recently used entries are evicted while the cache holds more
than ``max_bytes`` of keys and values.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from mtfm.serve.falcon import UserPrefix


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0  # misses on an entry whose version differed (or that had expired)
    evictions: int = 0

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass
class _Entry:
    version: Hashable
    prefix: UserPrefix
    stored_at: float
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.prefix.nbytes


class PrefixCache:
    """Thread-safe LRU of user prefixes: ``get`` / ``put`` / ``invalidate``, with counters."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or ttl_s <= 0:
            raise ValueError(f"max_bytes ({max_bytes}) and ttl_s ({ttl_s}) must be > 0")
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user: Hashable, version: Hashable) -> UserPrefix | None:
        """The cached prefix of ``user`` at ``version``, or None (a miss)."""
        with self._lock:
            entry = self._entries.get(user)
            if entry is not None and (entry.version != version or self._clock() - entry.stored_at > self.ttl_s):
                self._drop(user)
                self.stats.stale += 1
                entry = None
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(user)
            self.stats.hits += 1
            return entry.prefix

    def put(self, user: Hashable, version: Hashable, prefix: UserPrefix) -> None:
        """Store (or replace) ``user``'s prefix; evict least recently used entries beyond the bound.
        A prefix larger than the whole bound is not stored."""
        entry = _Entry(version, prefix, self._clock())
        with self._lock:
            if user in self._entries:
                self._drop(user)
            if entry.nbytes > self.max_bytes:
                return
            self._entries[user] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.stats.evictions += 1

    def invalidate(self, user: Hashable) -> bool:
        """Forget ``user``'s prefix (its behaviour changed); True when there was one."""
        with self._lock:
            return self._drop(user)

    def _drop(self, user: Hashable) -> bool:
        entry = self._entries.pop(user, None)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        return True
