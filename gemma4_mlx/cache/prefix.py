"""Prefix reuse: a cache holding one prompt serves another from their longest shared
prefix, rolled back exactly (sliding layers included, `LayerCaches.trim`).

`common_prefix` / `sync_prefix` are what `Chat` does between turns; `PrefixPool`
is the server's: a few single-row caches with the keys they hold, least recently
used dropped first within a byte budget (docs/serving.md §4).  Keys are per prompt
position the token id, or a media content key at placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gemma4_mlx.cache.caches import LayerCaches


def common_prefix(cached: Sequence, keys: Sequence) -> int:
    """Positions a cache holding `cached` can keep for a prompt `keys`: the shared
    prefix, leaving at least one token to feed, never ending inside a media run
    (its rows are prefilled together)."""
    n = 0
    limit = min(len(cached), len(keys) - 1)
    while n < limit and cached[n] == keys[n]:
        n += 1
    while (
        0 < n < len(keys)
        and isinstance(keys[n], tuple)
        and isinstance(keys[n - 1], tuple)
        and keys[n][:2] == keys[n - 1][:2]
    ):
        n -= 1
    return n


def sync_prefix(cache, cached: Sequence, keys: Sequence, fresh: Callable[[], object]) -> tuple[object, int]:
    """Roll `cache` (holding `cached`) back to the longest prefix it shares with
    `keys` (exact: `LayerCaches.trim`); (cache, where prefilling starts).  A cache
    that cannot roll back that far (past a sliding window's slack) is replaced by
    `fresh()` and prefilling starts at 0."""
    n = common_prefix(cached, keys)
    drop = len(cached) - n
    if drop:
        try:
            cache.trim(drop)
        except ValueError:
            return fresh(), 0
    return cache, n


@dataclass
class _Entry:
    keys: list
    cache: LayerCaches

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache.writers())


class PrefixPool:
    """Single-row caches of finished prompts, most recently used last.

    `take(keys)` gives a *copy* of the entry sharing the longest prefix with `keys`,
    rolled back to it, and where prefilling starts — so concurrent requests with one
    system prompt all reuse it.  `put(keys, cache)` files a finished row's cache;
    entries it extends are dropped, then the oldest until the pool fits the budget.
    """

    def __init__(self, fresh: Callable[[], LayerCaches], budget_bytes: int, max_entries: int = 64):
        self.fresh, self.budget, self.max_entries = fresh, max(0, int(budget_bytes)), max_entries
        self.entries: list[_Entry] = []
        self.hits = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def take(self, keys: Sequence) -> tuple[LayerCaches, int]:
        shared = [common_prefix(e.keys, keys) for e in self.entries]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        if best is None or shared[best] == 0:
            return self.fresh(), 0
        entry = self.entries.pop(best)
        self.entries.append(entry)  # most recently used
        copy = self.fresh()
        copy.restore(entry.cache.snapshot())  # restored slices never see later writes
        cache, n = sync_prefix(copy, entry.keys, keys, self.fresh)
        if n:
            self.hits += 1
            self.reused_tokens += n
        return cache, n

    def put(self, keys: Sequence, cache: LayerCaches) -> None:
        keys = list(keys)
        if not keys or self.budget == 0:
            return
        self.entries = [e for e in self.entries if not _extends(keys, e.keys)]
        self.entries.append(_Entry(keys, cache))
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries or self.nbytes > self.budget):
            self.entries.pop(0)
        if self.entries and self.entries[0].nbytes > self.budget:
            self.entries.clear()  # one entry larger than the whole budget


def _extends(longer: list, shorter: list) -> bool:
    return len(shorter) <= len(longer) and longer[: len(shorter)] == shorter
