"""KV caches for Gemma 4: exact rollback, also after the sliding window wrapped.

Both caches keep keys in *slot order* (no ring buffer), so dropping the newest n
entries is always a length change.  The sliding cache retains W - 1 + R entries
(R = `max_rollback`): enough for the next query's window even after R tokens
were rolled back.  mlx-lm's `RotatingKVCache` cannot undo writes once it has
wrapped (docs/text-decoder.md §5.3), which is why these are our own.

Batching: every row shares one slot axis.  Two per-row numbers, each with one meaning:
  left_pad[b]    row b's token at slot s sits at position s - left_pad[b] (RoPE);
  valid_from[b]  slots before it hold nothing of row b (prompt left padding, or the
                 slack a ragged speculative commit left, `roll`): the mask hides them.
Right after a left-padded prefill both equal the padding; a ragged commit moves
both, and `valid_from` never drops below the oldest retained slot.  Invalid keys
are masked (never zeroed: a zero key still counts in the softmax).

A model's caches are one `LayerCaches` (a list by layer; KV-shared consumer layers
hold None) whose methods act on every layer at once: `trim`, `offset`, `commit`,
`filter`, `snapshot` / `restore`.  `LayerCache` is what one layer's cache offers.

With `kv_bits` 8 or 4 the K/V buffers are quantized triples (docs/kv-cache.md):
each slot is quantized on its own, so every operation here stays exact on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import mlx.core as mx

from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.cache.mask import Mask, build_mask

STEP = 256  # buffer growth granularity (slots)


@runtime_checkable
class LayerCache(Protocol):
    """One attention layer's K/V cache, as attention, the drafter and the loops use it."""

    offset: int  # slots written so far: the next token's slot
    window: int | None  # sliding window W; None for full attention
    left_pad: mx.array | None  # [B] slot - position per row; None: 0 for every row
    valid_from: mx.array | None  # [B] first slot holding the row's keys; None: 0

    @property
    def size(self) -> int: ...  # retained entries

    @property
    def state(self) -> tuple: ...  # retained K, V: arrays, quantized triples, or None

    def positions(self) -> mx.array | int: ...
    def mask(self, n_new: int) -> Mask: ...
    # K / V come back as arrays, quantized triples, or (quantized K = V layers) keys as
    # `cache.quantized.SplitKeys`: hand them to `cache.quantized.attention`
    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple: ...
    def trim(self, n: int) -> int: ...
    def filter(self, rows: Sequence[int]) -> None: ...
    def roll(self, shifts: Sequence[int]) -> None: ...
    def check_rows(self) -> None: ...
    def draft_view(self, n_keys: int | None) -> tuple: ...  # (K, V as above, Mask)
    def snapshot(self) -> dict: ...
    def restore(self, snap: dict) -> None: ...


_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}  # same-width bit patterns


def _own_copy(t: mx.array) -> mx.array:
    """t in a buffer of its own.  `mx.contiguous` returns an already contiguous slice
    (one row of a one-head cache) as a view of its buffer; a product by 1 always
    writes a new one.  It multiplies the bit patterns as unsigned integers, so that no
    backend's float arithmetic (a GPU flushing subnormals) can change a value."""
    bits = _UINT[t.dtype.size]
    return (t.view(bits) * 1).view(t.dtype)


class _Cache:
    """Shared slot bookkeeping of both cache kinds."""

    window: int | None = None

    def __init__(self, left_pad=None, kv_bits: int | None = None, key_split: kvs.KeySplit | None = None):
        # keys / values: float arrays, or quantized triples with kv_bits 8 / 4
        # (`cache.quantized`; every slot operation below handles both)
        self.kv_bits = kvs.check_bits(kv_bits)
        # a quantized K = V layer keeps only its rotated key dims (docs/kv-cache.md §7)
        self.key_split = key_split if self.kv_bits is not None else None
        self.keys = self.values = None
        self.offset = 0  # slots written so far (the next token's slot)
        self.left_pad = None if left_pad is None else mx.array(left_pad, dtype=mx.int32)
        self.valid_from = self.left_pad  # first slot holding row b's data
        self._start = 0  # buffer index of the oldest retained slot
        self._end = 0  # buffer index one past the newest slot

    # -- geometry ------------------------------------------------------------
    @property
    def size(self) -> int:
        """Retained entries."""
        return self._end - self._start

    def positions(self) -> mx.array | int:
        """RoPE offset of the next token: an int, or per-row [B] when padded."""
        if self.left_pad is None:
            return self.offset
        return self.offset - self.left_pad

    def key_start(self, n_new: int) -> int:
        """Slot of the first key `update_and_fetch` returns for n_new new tokens."""
        return self.offset - self.size

    def mask(self, n_new: int) -> Mask:
        """Mask for n_new queries over the keys update_and_fetch will return."""
        return build_mask(self.offset, self.key_start(n_new), n_new, self.window, self.valid_from)

    # -- storage -------------------------------------------------------------
    def _write(self, k: mx.array, v: mx.array) -> None:
        T = k.shape[2]
        if self.key_split is not None:
            k = self.key_split.keys(k)
        if self.kv_bits is not None:  # each slot's entry is quantized on its own
            k, v = kvs.encode(k, self.kv_bits), kvs.encode(v, self.kv_bits)
        if self.keys is None or self._end + T > kvs.length(self.keys):
            self._grow(k, v, T)
        kvs.put(self.keys, self._end, k)
        kvs.put(self.values, self._end, v)
        self._end += T
        self.offset += T

    def _grow(self, k, v, T):
        keep = self._retain_on_grow()
        cap = ((keep + T + STEP - 1) // STEP) * STEP
        new_k, new_v = kvs.zeros(k, cap), kvs.zeros(v, cap)
        if keep:
            kvs.put(new_k, 0, kvs.slots(self.keys, self._end - keep, self._end))
            kvs.put(new_v, 0, kvs.slots(self.values, self._end - keep, self._end))
        self.keys, self.values = new_k, new_v
        self._start, self._end = 0, keep

    def _retain_on_grow(self) -> int:
        return self.size

    def _fetched(self, k, v) -> tuple:
        """Stored keys as attention reads them (split keys carry how, §7)."""
        return (k if self.key_split is None else kvs.SplitKeys(k, self.key_split)), v

    def trim(self, n: int) -> int:
        """Drop the newest n entries (rejected draft tokens). Returns n."""
        if n < 0 or n > self.size:
            raise ValueError(f"cannot trim {n} entries from a cache holding {self.size}")
        self._end -= n
        self.offset -= n
        return n

    def filter(self, rows) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        rows = mx.array(rows, dtype=mx.int32)
        if self.keys is not None:
            self.keys, self.values = (kvs.tmap(lambda t: t[rows], b) for b in (self.keys, self.values))
        if self.left_pad is not None:
            self.left_pad, self.valid_from = self.left_pad[rows], self.valid_from[rows]

    def roll(self, shifts) -> None:
        """Move row b's entries `shifts[b]` slots later (ragged speculative commit).

        Every row then ends at the common write slot: its newest shifts[b] entries
        (rejected drafts) fall off the end and the slots opened at the front become
        invalid slack.  RoPE is already baked into the keys, so positions only need
        the per-row bookkeeping (docs/speculative.md §10.3, option A).
        """
        shifts = [int(s) for s in shifts]
        if not any(shifts):
            return
        B = len(shifts)
        if self.left_pad is None:
            self.left_pad = self.valid_from = mx.zeros((B,), mx.int32)
        sh = mx.array(shifts, dtype=mx.int32)
        oldest = self.offset - self.size
        self.left_pad = self.left_pad + sh
        self.valid_from = mx.maximum(self.valid_from, oldest) + sh
        if self.keys is not None and self.size:
            self._shift_rows(shifts)

    def _shift_rows(self, shifts: list[int]) -> None:
        """Row b's retained entries `shifts[b]` slots later, in place.  Only moved rows
        are copied, each out and back once: a shifted slice of a buffer written into
        that same buffer aliases it, and MLX then copies the whole buffer (every row,
        every slot) per write; a gather over all rows measured no better.  The
        copies are evaluated first so that the writes find the buffers unshared (dense
        bench target, B = 4: a ragged commit 120-160 ms before, docs/speculative.md §10.3)."""
        a, end = self._start, self._end
        moved = [(b, s) for b, s in enumerate(shifts) if 0 < s < end - a]  # s >= size: all fall off
        if not moved:
            return
        saved = [
            [(b, s, kvs.tmap(lambda t, b=b, s=s: _own_copy(t[b : b + 1, :, a : end - s]), buf)) for b, s in moved]
            for buf in (self.keys, self.values)
        ]
        mx.eval(saved)
        for buf, rows in zip((self.keys, self.values), saved):
            for b, s, x in rows:
                kvs.put_row(buf, b, a + s, x)

    def check_rows(self) -> None:
        """Refuse a state in which some row lost keys its next query needs."""
        if self.window is None:
            return
        valid = (self.offset - mx.maximum(self.valid_from, self.offset - self.size)).tolist()
        have = (self.offset - self.left_pad).tolist()
        for b, (v, h) in enumerate(zip(valid, have)):
            if v < min(self.window - 1, h):
                raise ValueError(
                    f"sliding cache row {b} keeps {v} of the {self.window - 1} keys "
                    f"its window needs: raise max_rollback above the draft length"
                )

    def draft_view(self, n_keys: int | None) -> tuple[mx.array, mx.array, Mask]:
        """The committed K/V of this (producer) layer for an MTP drafter query, and its mask.

        The drafter reads every valid retained key (full layers, n_keys None) or the
        newest n_keys of them (sliding layers), docs/speculative.md §4.
        """
        k, v = self.state  # quantized triples stay quantized: the drafter's attention reads them
        if n_keys is not None and kvs.length(k) > n_keys:  # read only the window, not the slack
            k, v = kvs.slots(k, -n_keys), kvs.slots(v, -n_keys)
        start = self.offset - kvs.length(k)
        k, v = self._fetched(k, v)
        slots = mx.arange(start, self.offset)[None, :]
        allowed = slots >= 0 if n_keys is None else slots >= self.offset - n_keys
        if self.valid_from is not None:
            allowed = allowed & (slots >= self.valid_from[:, None])
        return k, v, Mask(allowed[:, None, None, :], self.offset - 1, start, None)

    def snapshot(self) -> dict:
        """A restorable state; cheap (MLX slices share the buffers lazily)."""
        kv = None if self.keys is None else self.state
        return {"kv": kv, "offset": self.offset, "left_pad": self.left_pad, "valid_from": self.valid_from}

    def restore(self, snap: dict) -> None:
        kv = snap["kv"]
        self.offset, self.left_pad = snap["offset"], snap["left_pad"]
        self.valid_from = snap.get("valid_from", self.left_pad)
        if kv is None:
            self.keys = self.values = None
            self._start = self._end = 0
        else:
            # The slices are separate array objects: in-place writes to the live
            # buffers after this never reach the snapshot.  A full buffer regrows
            # (with a copy) on the next write.
            self.keys, self.values = kv
            self._start, self._end = 0, kvs.length(kv[0])

    @property
    def state(self):
        if self.keys is None:
            return None, None
        return kvs.slots(self.keys, self._start, self._end), kvs.slots(self.values, self._start, self._end)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else kvs.nbytes(self.keys) + kvs.nbytes(self.values)


class KVCache(_Cache):
    """Full-attention cache: keeps every slot."""

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self._write(k, v)
        return self._fetched(kvs.slots(self.keys, 0, self._end), kvs.slots(self.values, 0, self._end))


class SlidingKVCache(_Cache):
    """Sliding-window cache with rollback slack.

    A query at slot q sees keys q - W < k <= q (W keys including itself).
    """

    def __init__(self, window: int, max_rollback: int = 32, left_pad=None, kv_bits: int | None = None, key_split=None):
        super().__init__(left_pad, kv_bits, key_split)
        self.window = window
        self.max_rollback = max_rollback
        self.keep = window - 1 + max_rollback

    def key_start(self, n_new: int) -> int:
        # Keys older than the window of the first new query are not returned.
        return max(self.offset - self.size, self.offset - (self.window - 1))

    def _retain_on_grow(self) -> int:
        return min(self.size, self.keep)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        first = self.key_start(k.shape[2])
        self._write(k, v)
        lo = self._end - (self.offset - first)
        out = self._fetched(kvs.slots(self.keys, lo, self._end), kvs.slots(self.values, lo, self._end))
        self._start = max(self._start, self._end - self.keep)
        return out

    def trim(self, n: int) -> int:
        after = self.size - n
        if n > 0 and after < min(self.window - 1, self.offset - n):
            raise ValueError(
                f"sliding cache cannot roll back {n} tokens: it keeps {self.max_rollback} "
                f"tokens of slack beyond the window (raise max_rollback in make_cache)"
            )
        return super().trim(n)
