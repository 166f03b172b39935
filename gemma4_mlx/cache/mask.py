"""Attention masks over cache slots: causal, sliding window, per-row validity, and
bidirectional image blocks (docs/multimodal.md §3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class Mask:
    """A boolean attention mask plus the slot geometry it was built from.

    `array` is [B|1, 1, T, S] for queries at slots q_start.. and keys at slots
    k_start..; the geometry lets attention skip key blocks that are all masked.
    """

    array: mx.array
    q_start: int
    k_start: int
    window: int | None
    # Bidirectional image blocks: per query, the index (in this chunk) of the last
    # query of its block, which it may see; None when no query sees later keys.
    ahead: np.ndarray | None = None

    def last(self, n: int) -> Mask:
        """The mask of the last n queries only."""
        cut = self.array.shape[2] - n
        return Mask(
            self.array[..., cut:, :],
            self.q_start + cut,
            self.k_start,
            self.window,
            None if self.ahead is None else self.ahead[cut:] - cut,
        )

    def key_range(self, a: int, b: int) -> tuple[int, int]:
        """Key indices [lo, hi) that queries a..b-1 may see."""
        last = b - 1 if self.ahead is None else max(b - 1, int(self.ahead[a:b].max()))
        hi = self.q_start + last + 1 - self.k_start
        lo = 0 if self.window is None else max(0, self.q_start + a - self.window + 1 - self.k_start)
        return lo, min(hi, self.array.shape[3])

    def with_blocks(self, blocks) -> Mask:
        """Add bidirectional attention inside blocks (docs/multimodal.md §3.3).

        blocks: block id per query ([T] ints, -1 outside any block).  The queries
        are the newest T keys; a block never continues from an earlier chunk, so
        older keys are in no block.  Within a block a query sees every key, later
        ones too, except past keys beyond the window: `(q - k < W) and (k <= q or
        same block)`, as transformers builds it.
        """
        T, S = self.array.shape[2], self.array.shape[3]
        blocks = np.asarray(blocks)
        ahead = np.arange(T)
        for b in np.unique(blocks[blocks >= 0]):
            where = np.flatnonzero(blocks == b)
            ahead[where] = where[-1]
        bq = mx.array(blocks)
        bk = mx.concatenate([mx.full((S - T,), -1, bq.dtype), bq])
        same = (bq[:, None] == bk[None, :]) & (bq[:, None] >= 0)
        if self.window is not None:
            q = mx.arange(self.q_start, self.q_start + T)[:, None]
            k = mx.arange(self.k_start, self.k_start + S)[None, :]
            same = same & (q - k < self.window)
        return Mask(self.array | same, self.q_start, self.k_start, self.window, ahead=ahead)


def build_mask(offset: int, key_start: int, n_new: int, window: int | None, valid_from: mx.array | None) -> Mask:
    """Mask for queries at slots offset..offset+n_new-1 and keys at slots
    key_start..offset+n_new-1; row b's keys before slot valid_from[b] are invalid.

    Padded query rows may see themselves so that their (ignored) outputs stay finite.
    """
    q = mx.arange(offset, offset + n_new)[:, None]
    k = mx.arange(key_start, offset + n_new)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    if valid_from is not None:
        valid = k[None] >= valid_from[:, None, None]
        allowed = (allowed[None] & (valid | (k == q)[None]))[:, None]
    else:
        allowed = allowed[None, None]
    return Mask(allowed, offset, key_start, window)
