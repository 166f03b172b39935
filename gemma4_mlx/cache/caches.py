"""`LayerCaches`: a model's caches by layer, with methods that act on every layer at once."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from gemma4_mlx.cache import rows
from gemma4_mlx.cache.layer import KVCache, LayerCache, SlidingKVCache


class LayerCaches(list):
    """A model's caches by layer: a `LayerCache` for every layer that writes K/V, None
    for the KV-shared consumer layers (they read their producer's K/V).  Indexing
    and iteration are a list's; the methods act on every layer at once."""

    @classmethod
    def for_layers(
        cls,
        layer_types: Sequence[str],
        first_shared: int,
        window: int,
        *,
        max_rollback: int = 32,
        left_pad=None,
        kv_bits: int | None = None,
        key_splits: dict | None = None,
    ) -> LayerCaches:
        """kv_bits: 8 or 4 store every layer's K/V quantized (`cache.quantized`);
        None or 16 keep the model's float dtype.  key_splits: layer index -> the
        `KeySplit` of a K = V layer (used with kv_bits 8 / 4 only, docs/kv-cache.md §7)."""
        caches = cls()
        for i, t in enumerate(layer_types):
            split = (key_splits or {}).get(i)
            if i >= first_shared:
                caches.append(None)
            elif t == "sliding_attention":
                caches.append(SlidingKVCache(window, max_rollback, left_pad, kv_bits, split))
            else:
                caches.append(KVCache(left_pad, kv_bits, split))
        return caches

    @classmethod
    def of(cls, caches) -> LayerCaches:
        """`caches` itself when it is a LayerCaches, else a LayerCaches over the same
        layer caches (a plain list a caller built)."""
        return caches if isinstance(caches, cls) else cls(caches)

    def writers(self) -> list[LayerCache]:
        """The caches of the layers that write K/V (no None)."""
        return [c for c in self if c is not None]

    @property
    def offset(self) -> int:
        """Slots written so far (every layer cache has written the same number)."""
        return next(c.offset for c in self if c is not None)

    @property
    def rollback_room(self) -> float:
        """How many of the newest tokens `trim` can always take back: a sliding layer's
        slack beyond its window (`max_rollback`); unbounded without sliding layers."""
        return min((c.max_rollback for c in self.writers() if isinstance(c, SlidingKVCache)), default=float("inf"))

    @property
    def state(self) -> list:
        """(K, V) of every writing layer: what `mx.eval` needs to materialise them."""
        return [c.state for c in self.writers()]

    def trim(self, n: int) -> None:
        """Drop the newest n entries of every row (rejected drafts, a rolled-back turn)."""
        for c in self.writers():
            c.trim(n)

    def trim_to(self, offset: int) -> None:
        """Drop every entry past `offset`, if any: what a stopped generation keeps of
        the steps it queued ahead or the drafts it accepted past its end."""
        if self.offset > offset:
            self.trim(self.offset - offset)

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        for c in self.writers():
            c.filter(rows)

    def commit(self, accepted: Sequence[int], drafted: int) -> None:
        """After verifying drafted + 1 tokens per row, keep accepted[b] + 1 of them in row b.

        Common tail first (a length change), then each row rolled so that all rows end
        at the same slot again (`_Cache.roll`).
        """
        accepted = [int(a) for a in accepted]
        top = max(accepted)
        shifts = [top - a for a in accepted]
        for c in self.writers():
            c.trim(drafted - top)
            c.roll(shifts)
        # Every sliding cache has the same geometry: one check (it reads back to the host)
        # covers them all.
        sliding = next((c for c in self.writers() if c.window is not None), None)
        if sliding is not None and any(shifts):
            sliding.check_rows()

    def snapshot(self) -> list:
        """Per layer a restorable state (None for consumer layers); cheap."""
        return [None if c is None else c.snapshot() for c in self]

    def restore(self, snaps: Sequence) -> None:
        for c, s in zip(self, snaps):
            if c is not None:
                c.restore(s)

    # -- continuous batching (cache/rows.py) -----------------------------------
    def join(self, other: LayerCaches) -> None:
        """Append the rows of `other` (a prefilled cache of the same model) to this
        batch, aligned at the common write slot."""
        for mine, theirs in zip(self, other):
            if mine is not None:
                mine.restore(rows.join_rows(mine.snapshot(), theirs.snapshot()))

    def take_row(self, row: int, into: LayerCaches) -> LayerCaches:
        """Copy batch row `row` into `into` (fresh caches of the same model) as a
        single unpadded row; returns `into`."""
        for mine, out in zip(self, into):
            if mine is not None:
                out.restore(rows.take_row(mine.snapshot(), row))
        mx.eval(into.state)  # its own buffers now, not a lazy view of the batch's
        return into

    def compact(self, min_slots: int = 256) -> None:
        """Free leading slots that no row can see any more (rows that left the batch
        held them), when at least `min_slots` of them are dead in a full-attention
        layer (fewer is not worth the copy the next write makes)."""
        snaps = [c.snapshot() for c in self.writers()]
        dead = [rows.dead_slots(s) for s in snaps]
        if max(dead, default=0) < min_slots:
            return
        for c, s, n in zip(self.writers(), snaps, dead):
            c.restore(rows.drop_front(s, n))
