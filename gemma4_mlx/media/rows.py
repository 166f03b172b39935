"""Soft-token rows of images, video frames and audio clips inside a token sequence.

`MediaRows` is what the text decoder needs beyond the token ids (see
docs/multimodal.md §3): which positions are placeholders, the embeddings that replace them, and
which of them form one bidirectional block (one image or one video frame).
It describes one prompt (batch row 0) and is cut per prefill chunk with `window`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

IMAGE, VIDEO, AUDIO = 1, 2, 3  # mm_token_type_ids of the reference


@dataclass
class MediaRows:
    index: np.ndarray  # [N] ascending positions of placeholder tokens in the sequence
    rows: mx.array  # [N, H] their embeddings (text space, unscaled), same order
    block: np.ndarray  # [N] block id (one per contiguous image / video-frame run), -1 for audio

    def __post_init__(self):
        self.index = np.asarray(self.index, dtype=np.int64)
        self.block = np.asarray(self.block, dtype=np.int64)
        if self.rows.shape[0] != self.index.size or self.block.size != self.index.size:
            raise ValueError(f"media rows: {self.rows.shape[0]} embeddings for {self.index.size} placeholder positions")

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int, int]], rows: mx.array) -> MediaRows:
        """runs: (start, length, kind) per contiguous placeholder run, in sequence order;
        rows: their embeddings concatenated in that order."""
        index, block, next_block = [], [], 0
        for start, n, kind in runs:
            index.append(np.arange(start, start + n))
            if kind == AUDIO:
                block.append(np.full(n, -1))
            else:
                block.append(np.full(n, next_block))
                next_block += 1

        def cat(xs):
            return np.concatenate(xs) if xs else np.zeros(0, np.int64)

        return cls(cat(index), rows, cat(block))

    def window(self, start: int, end: int) -> MediaRows | None:
        """The placeholders in positions [start, end), re-indexed from start; None if none."""
        a, b = np.searchsorted(self.index, [start, end])
        if a == b:
            return None
        return MediaRows(self.index[a:b] - start, self.rows[int(a) : int(b)], self.block[a:b])

    def block_ids(self, length: int) -> np.ndarray | None:
        """Block id per position of a slice of `length` tokens (-1 outside blocks);
        None when the slice holds no image/video block."""
        if not (self.block >= 0).any():
            return None
        out = np.full(length, -1, dtype=np.int64)
        out[self.index] = self.block
        return out

    def cut(self, start: int, end: int) -> int:
        """A chunk end near `end` that splits no placeholder run: moved back to the
        run's start, or past its end when the run begins at `start`."""
        i = np.searchsorted(self.index, end)  # first placeholder at or after `end`
        if i == 0 or i == self.index.size or self.index[i] != end or self.index[i - 1] != end - 1:
            return end  # position `end` does not continue a run that reaches end - 1
        j = i - 1
        while j > 0 and self.index[j - 1] == self.index[j] - 1:
            j -= 1
        if self.index[j] > start:
            return int(self.index[j])
        k = i
        while k + 1 < self.index.size and self.index[k + 1] == self.index[k] + 1:
            k += 1
        return int(self.index[k]) + 1
