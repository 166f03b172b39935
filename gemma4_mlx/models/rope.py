"""Rotary position embedding of Gemma 4 (docs/text-decoder.md §4.6, §6.2)."""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx import ops


class RoPE(nn.Module):
    """Rotate-half RoPE; full layers use Gemma 4's proportional variant.

    Proportional: 64 of d/2 frequency pairs rotate with denominator d (not 128);
    the rest get an infinite period, i.e. pass through (docs/text-decoder.md §4.6).
    """

    def __init__(self, head_dim: int, params: dict):
        super().__init__()
        self.dims = head_dim
        theta = params["rope_theta"]
        factor = params.get("factor") or 1.0
        if params["rope_type"] == "proportional":
            n_rot = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
            i = mx.arange(head_dim // 2, dtype=mx.float32)
            periods = mx.power(theta, 2 * i / head_dim) * factor
            self._freqs = mx.where(i < n_rot, periods, mx.inf)
            self.base = None
        elif params["rope_type"] == "default":
            self._freqs, self.base = None, theta
        else:
            raise ValueError(f"unsupported rope_type {params['rope_type']!r}")
        self._memo: _Angles | None = None

    def rotated_dims(self) -> list[int]:
        """Head dims this rotation changes (rotate-half pairs i and i + d/2 of every
        finite period); the others pass through unchanged."""
        half = self.dims // 2
        if self._freqs is None:
            return list(range(self.dims))
        pairs = [i for i, f in enumerate(self._freqs.tolist()) if math.isfinite(f)]
        return pairs + [i + half for i in pairs]

    def __call__(self, x, offset):
        return ops.rope(x, offset, base=self.base, freqs=self._freqs, angles=lambda: self._angles(offset, x.shape[2]))

    def _angles(self, offset, T: int) -> tuple[mx.array, mx.array]:
        """cos/sin of T positions from offset, computed once and shared by every layer
        using this rotation in a forward (they pass the same int, or the same [B] array).
        Only within one thread: a memo's arrays are lazy on the stream of the thread
        that made them, and another thread's forward (a model shared between chats on
        two threads) must not evaluate them (it crashed MLX)."""
        memo = self._memo
        if memo is None or memo.thread != threading.get_ident():
            same_offset = False
        elif isinstance(offset, int):
            same_offset = isinstance(memo.offset, int) and memo.offset == offset
        else:
            same_offset = memo.offset is offset
        if not (same_offset and memo.T == T and memo.freqs is self._freqs):
            inv = ops.rope_inv_freqs(self.dims, self.base, self._freqs)
            angles = ops.rope_angles(inv, offset, T)
            memo = self._memo = _Angles(offset, T, self._freqs, *angles, threading.get_ident())
        return memo.cos, memo.sin


class _Angles:
    """RoPE's memo (a plain object: a module attribute that is no parameter).  It holds
    the offset and frequencies it was made for, so that identity comparisons are sound;
    a caller must pass a new array for new offsets (the model does: `positions()`)."""

    def __init__(self, offset, T: int, freqs, cos: mx.array, sin: mx.array, thread: int):
        self.offset, self.T, self.freqs, self.cos, self.sin = offset, T, freqs, cos, sin
        self.thread = thread
