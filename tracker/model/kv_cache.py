"""Per-conversation key/value caches of the prompt prefix, bounded in bytes with LRU eviction.

An entry holds the token ids of a conversation's cached prefix (``<bos>`` and its context lines)
and, for each decoder layer the label head needs, that prefix's keys and values. Whoever uses an
entry checks its ids against the prefix the next prompt needs: a cache whose ids are not a prefix
of it (the window slid, the history differs, the entry was evicted) is simply rebuilt, so an entry
can never change a label, only save work.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class PrefixEntry:
    """The cached prefix of one conversation."""

    token_ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer (kv_heads, P, head_dim)
    values: list[torch.Tensor]  # per layer (kv_heads, P, head_dim)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError("keys and values must cover the same layers")
        for k, v in zip(self.keys, self.values):
            if k.shape[-2] != len(self.token_ids) or v.shape[-2] != len(self.token_ids):
                raise ValueError(f"cached length {k.shape[-2]} != {len(self.token_ids)} prefix tokens")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        return tensors + 8 * len(self.token_ids)


@dataclass
class CacheStats:
    hits: int = 0  # the cached prefix was reused (possibly extended)
    rebuilds: int = 0  # an entry existed but no longer matched (the window slid)
    misses: int = 0  # no entry (new conversation, or evicted)
    evictions: int = 0
    oversize: int = 0  # entries larger than the whole budget, never stored
    expired: int = 0  # entries dropped after `expire_idle` seconds unused (the conversation went quiet)
    forgotten: int = 0  # entries dropped because their conversation ended (`pop`)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class KVCacheStore:
    """LRU map conversation key -> PrefixEntry, at most `max_bytes` in all (thread-safe)."""

    max_bytes: int
    _entries: "OrderedDict[str, PrefixEntry]" = field(default_factory=OrderedDict, repr=False)
    _bytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _used: dict = field(default_factory=dict, repr=False)  # key -> monotonic time of last get/put

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> PrefixEntry | None:
        """The entry (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._used[key] = time.monotonic()
            return entry

    def put(self, key: str, entry: PrefixEntry) -> None:
        """Store (or replace) an entry, evicting least recently used ones to stay within max_bytes."""
        with self._lock:
            self._drop(key)
            size = entry.nbytes
            if size > self.max_bytes:
                self.stats.oversize += 1
                return
            while self._entries and self._bytes + size > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._used.pop(old_key, None)
                self._bytes -= old.nbytes
                self.stats.evictions += 1
            self._entries[key] = entry
            self._used[key] = time.monotonic()
            self._bytes += size

    def pop(self, key: str) -> None:
        """Forget a conversation (it ended)."""
        with self._lock:
            if self._drop(key):
                self.stats.forgotten += 1

    def expire_idle(self, max_idle_s: float) -> int:
        """Drop the entries unused for `max_idle_s` seconds (conversations that went away without a
        `stop`); the LRU order is the use order, so the scan stops at the first fresh entry."""
        cutoff = time.monotonic() - max_idle_s
        n = 0
        with self._lock:
            while self._entries:
                key = next(iter(self._entries))
                if self._used.get(key, 0.0) > cutoff:
                    break
                self._drop(key)
                n += 1
            self.stats.expired += n
        return n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used.clear()
            self._bytes = 0

    def _drop(self, key: str) -> bool:
        old = self._entries.pop(key, None)
        self._used.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        return old is not None
