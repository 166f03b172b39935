"""Rows joining and leaving a running batch: continuous batching on one slot axis
(docs/serving.md §3).

A layer cache's state, as `snapshot` gives it, is its retained K/V [B, H, S, D]
ending at the write slot `offset`, plus per-row `left_pad` (slot - position) and
`valid_from` (first slot holding the row's keys).  Every row of a batch ends at the
same write slot, so a row that joins is aligned *at the end*: whichever side holds
fewer slots is moved later by the difference (its `left_pad` and `valid_from` grow
by it, exactly as a left-padded prompt's would), and the shorter retained region is
padded at the front with keys its mask hides.  RoPE is already applied to cached
keys, so moving a row between slots changes no number it attends with.

These functions work on snapshots and return snapshots; `LayerCaches.join`,
`take_row` and `compact` restore them into the live caches.  K and V may be float
arrays or quantized triples (`cache.quantized`): every component is moved along
its slot axis alike, so joins and takes stay exact on the quantized entries.
"""

from __future__ import annotations

import mlx.core as mx

from gemma4_mlx.cache import quantized as kvs


def _rows_meta(snap: dict, batch: int) -> tuple[mx.array, mx.array]:
    """(left_pad, valid_from) as [B] int32 arrays (None means 0 for every row)."""
    left = snap["left_pad"]
    left = mx.zeros((batch,), mx.int32) if left is None else left
    valid = snap.get("valid_from")
    return left, left if valid is None else valid


def _aligned(snap: dict, offset: int, size: int):
    """One side of a join moved to end at `offset` with `size` retained slots."""
    k, v = snap["kv"]
    B, S = kvs.batch(k), kvs.length(k)
    shift = offset - snap["offset"]
    left, valid = _rows_meta(snap, B)
    oldest = snap["offset"] - S
    left, valid = left + shift, mx.maximum(valid, oldest) + shift
    pad = size - S
    return kvs.pad_front(k, pad), kvs.pad_front(v, pad), left, valid


def join_rows(batch: dict, new: dict) -> dict:
    """The batch with `new`'s rows appended after its own."""
    if new["kv"] is None:
        raise ValueError("a row joins a batch only after its prompt was prefilled")
    if batch["kv"] is None:
        return new
    offset = max(batch["offset"], new["offset"])
    size = max(kvs.length(batch["kv"][0]), kvs.length(new["kv"][0]))
    ka, va, la, fa = _aligned(batch, offset, size)
    kb, vb, lb, fb = _aligned(new, offset, size)
    return {
        "kv": (kvs.concat_rows([ka, kb]), kvs.concat_rows([va, vb])),
        "offset": offset,
        "left_pad": mx.concatenate([la, lb]),
        "valid_from": mx.concatenate([fa, fb]),
    }


def take_row(snap: dict, row: int) -> dict:
    """Row `row` alone, as an unpadded single-row state (slots = positions again):
    its valid keys only, so a prefix cache can keep it."""
    k, v = snap["kv"]
    left, valid = _rows_meta(snap, kvs.batch(k))
    S, offset = kvs.length(k), snap["offset"]
    oldest = offset - S
    first = max(int(valid[row].item()), oldest)
    pad = int(left[row].item())
    cut = first - oldest
    return {
        # a copy: a slice would keep the whole batch buffer alive in the prefix pool
        "kv": tuple(kvs.tmap(lambda t: mx.contiguous(t[row : row + 1, :, cut:, :]), x) for x in (k, v)),
        "offset": offset - pad,
        "left_pad": None,
        "valid_from": None,
    }


def dead_slots(snap: dict) -> int:
    """Leading retained slots that no row can see (every row's keys start later)."""
    if snap["kv"] is None:
        return 0
    k = snap["kv"][0]
    S = kvs.length(k)
    oldest = snap["offset"] - S
    _, valid = _rows_meta(snap, kvs.batch(k))
    return max(0, min(int(mx.min(valid).item()), snap["offset"]) - oldest)


def drop_front(snap: dict, n: int) -> dict:
    """The state without its n oldest retained slots (slot numbers unchanged)."""
    if not n:
        return snap
    k, v = snap["kv"]
    return dict(snap, kv=(kvs.slots(k, n), kvs.slots(v, n)))
