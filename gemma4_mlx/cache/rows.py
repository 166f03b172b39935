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
`take_row` and `compact` restore them into the live caches.
"""

from __future__ import annotations

import mlx.core as mx


def _rows_meta(snap: dict, batch: int) -> tuple[mx.array, mx.array]:
    """(left_pad, valid_from) as [B] int32 arrays (None means 0 for every row)."""
    left = snap["left_pad"]
    left = mx.zeros((batch,), mx.int32) if left is None else left
    valid = snap.get("valid_from")
    return left, left if valid is None else valid


def _aligned(snap: dict, offset: int, size: int):
    """One side of a join moved to end at `offset` with `size` retained slots."""
    k, v = snap["kv"]
    B, S = k.shape[0], k.shape[2]
    shift = offset - snap["offset"]
    left, valid = _rows_meta(snap, B)
    oldest = snap["offset"] - S
    left, valid = left + shift, mx.maximum(valid, oldest) + shift
    pad = size - S
    if pad:
        k = mx.concatenate([mx.zeros((B, k.shape[1], pad, k.shape[3]), k.dtype), k], axis=2)
        v = mx.concatenate([mx.zeros((B, v.shape[1], pad, v.shape[3]), v.dtype), v], axis=2)
    return k, v, left, valid


def join_rows(batch: dict, new: dict) -> dict:
    """The batch with `new`'s rows appended after its own."""
    if new["kv"] is None:
        raise ValueError("a row joins a batch only after its prompt was prefilled")
    if batch["kv"] is None:
        return new
    offset = max(batch["offset"], new["offset"])
    size = max(batch["kv"][0].shape[2], new["kv"][0].shape[2])
    ka, va, la, fa = _aligned(batch, offset, size)
    kb, vb, lb, fb = _aligned(new, offset, size)
    return {
        "kv": (mx.concatenate([ka, kb]), mx.concatenate([va, vb])),
        "offset": offset,
        "left_pad": mx.concatenate([la, lb]),
        "valid_from": mx.concatenate([fa, fb]),
    }


def take_row(snap: dict, row: int) -> dict:
    """Row `row` alone, as an unpadded single-row state (slots = positions again):
    its valid keys only, so a prefix cache can keep it."""
    k, v = snap["kv"]
    left, valid = _rows_meta(snap, k.shape[0])
    S, offset = k.shape[2], snap["offset"]
    oldest = offset - S
    first = max(int(valid[row].item()), oldest)
    pad = int(left[row].item())
    cut = first - oldest
    return {
        "kv": (k[row : row + 1, :, cut:, :], v[row : row + 1, :, cut:, :]),
        "offset": offset - pad,
        "left_pad": None,
        "valid_from": None,
    }


def dead_slots(snap: dict) -> int:
    """Leading retained slots that no row can see (every row's keys start later)."""
    if snap["kv"] is None:
        return 0
    k = snap["kv"][0]
    S = k.shape[2]
    oldest = snap["offset"] - S
    _, valid = _rows_meta(snap, k.shape[0])
    return max(0, min(int(mx.min(valid).item()), snap["offset"]) - oldest)


def drop_front(snap: dict, n: int) -> dict:
    """The state without its n oldest retained slots (slot numbers unchanged)."""
    if not n:
        return snap
    k, v = snap["kv"]
    return dict(snap, kv=(k[..., n:, :], v[..., n:, :]))
