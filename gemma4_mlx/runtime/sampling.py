"""Sampling whose randomness is a function of (seed, row, output index).

Speculative decoding draws the token at output index n of row r from the target
distribution at that position (sample-and-compare, docs/speculative.md §8.2).  If the
random numbers used there depend only on (seed, r, n) — not on how many draft
tokens were verified in the same forward, nor on which other rows share the
batch — speculative output is token-for-token the output of plain sampling with
the same seed, and its distribution is exactly the target's.

Gumbel-max: argmax(logprobs / T + g) with g = -log(-log u) is a sample of
softmax(logprobs / T); u comes from a counter-based integer hash of
(seed, row, index, token id), evaluated on the device for the whole vocabulary.
Filters (top-p, min-p, top-k) are mlx-lm's, applied to the log-probabilities first,
in the order mlx-lm's own sampler applies them.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from gemma4_mlx import ops

_M = 0xFFFFFFFF


def _mix(x: int) -> int:
    """lowbias32 (Chris Wellons' integer hash), on host ints."""
    x &= _M
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M
    x ^= x >> 16
    return x


def _mix_mx(x: mx.array) -> mx.array:
    """The same hash, elementwise on uint32 arrays (multiplication wraps)."""
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, mx.uint32)
    return x ^ (x >> 16)


def fresh_seed() -> int:
    """A 32-bit seed for a run given none, from MLX's generator (so `mx.random.seed`
    repeats it, and ranks seeded alike draw alike): two exact 16-bit draws.  One
    `randint` below 2**31 goes through a float32 uniform: ~2**24.7 distinct values,
    so equal seeds would come within a few thousand runs."""
    hi, lo = mx.random.randint(0, 1 << 16, (2,)).tolist()
    return (hi << 16) | lo


def stream_key(seed: int, row: int, index: int) -> int:
    return _mix(_mix(_mix(seed) ^ (row * 0x9E3779B1)) ^ (index * 0x85EBCA77))


def uniforms(keys: list[int], vocab: int) -> mx.array:
    """[len(keys), vocab] floats in (0, 1), one independent stream per key."""
    return uniforms_at(keys, mx.arange(vocab, dtype=mx.uint32)[None, :])


def uniforms_at(keys: list[int], ids: mx.array) -> mx.array:
    """The floats of `uniforms` at token ids [len(keys) or 1, n] only."""
    k = mx.array(keys, dtype=mx.uint32)[:, None]
    v = ids.astype(mx.uint32) * mx.array(0x9E3779B9, mx.uint32)
    return unit_floats(_mix_mx(_mix_mx(k ^ v) + mx.array(0x632BE5AB, mx.uint32)))


def unit_floats(h: mx.array) -> mx.array:
    """uint32 hashes as floats strictly inside (0, 1): the top 23 bits, plus a half.
    With 24 bits the top value, 2**24 - 0.5, rounds to 2**24 in float32: u was 1.0
    in ~1.7 % of draws over a 262,144-token vocabulary, its Gumbel noise +inf, and
    the pick that token even where a filter or a grammar had masked it (-inf + inf
    is NaN, which argmax takes)."""
    return ((h >> 9).astype(mx.float32) + 0.5) * (1.0 / (1 << 23))


# A top_k up to this draws among its k candidates only (`PositionedSampler._shortlist`);
# top-p without such a top_k does too when its nucleus lies within this many tokens.
SHORTLIST_MAX = 4096

# A temperature below this is greedy: its 1/T would overflow float32 (inf times a
# log-probability of 0 is NaN), and it picks the argmax anyway.
GREEDY_BELOW = 1e-30


class PositionedSampler:
    """`sampler(logits [N, V], rows, indices) -> tokens [N]` with keyed randomness.

    temperature 0 is greedy (argmax) and ignores the keys (`SamplingOptions` makes
    any temperature below GREEDY_BELOW 0).  top_k at or above the vocabulary keeps all.
    """

    def __init__(
        self, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None
    ):
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.seed = 0 if seed is None else int(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def _filtered(self, x: mx.array) -> mx.array:
        """mlx-lm's filters over log-probabilities x [N, V], in its sampler's order."""
        if 0 < self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p:
            x = apply_min_p(x, self.min_p)
        if 0 < self.top_k < x.shape[-1]:  # mlx-lm's raises when k reaches the vocabulary
            x = apply_top_k(x, self.top_k)
        return x

    def __call__(self, logits: mx.array, rows, indices) -> mx.array:
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        keys = [stream_key(self.seed, int(r), int(i)) for r, i in zip(rows, indices)]
        lp, V = _normalised(logits), logits.shape[-1]
        if 0 < self.top_k <= SHORTLIST_MAX and self.top_k < V:
            return self._shortlist(keys, *_best(lp, self.top_k))
        if 0 < self.top_p < 1.0 and SHORTLIST_MAX < V:
            return self._nucleus(lp, keys)
        return self._full(lp, keys)

    def _nucleus(self, lp: mx.array, keys: list[int]) -> mx.array:
        """Top-p without a shortlisting top_k: a row whose nucleus lies among its
        SHORTLIST_MAX best tokens draws among those, the others over the whole
        vocabulary.  Decided per row (one host sync, ~5x cheaper than the sort), so
        a row takes the same path alone, batched or at a verify position."""
        ids, vals = _best(lp, SHORTLIST_MAX)
        # The nucleus lies among the candidates when the mass strictly above the
        # lowest of them reaches top_p: that value (every copy of it, some perhaps
        # outside the candidates) and all below are dropped.
        lowest = vals.min(axis=-1, keepdims=True)
        above = mx.where(vals > lowest, mx.exp(vals), 0.0).sum(axis=-1)
        inside = (above >= self.top_p).tolist()
        near = [r for r, ok in enumerate(inside) if ok]
        if len(near) == len(inside):
            return self._shortlist(keys, ids, vals)
        if not near:
            return self._full(lp, keys)
        far = [r for r, ok in enumerate(inside) if not ok]
        n, f = mx.array(near), mx.array(far)
        picks = mx.concatenate(
            [
                self._shortlist([keys[r] for r in near], ids[n], vals[n]),
                self._full(lp[f], [keys[r] for r in far]),
            ]
        )
        return picks[mx.argsort(mx.array(near + far))]

    def _full(self, lp: mx.array, keys: list[int]) -> mx.array:
        """The draw over the whole vocabulary: the filters, then Gumbel noise per token."""
        x = self._filtered(lp) * (1.0 / self.temperature)
        g = -mx.log(-mx.log(uniforms(keys, x.shape[-1])))
        return mx.argmax(x + g, axis=-1)

    def _shortlist(self, keys: list[int], ids: mx.array, vals: mx.array) -> mx.array:
        """`_full`'s draw among candidates ids [N, k] (log-probabilities vals) that
        hold every token the filters keep: the top_k when it is set, or a top-p
        nucleus found among them (`__call__`).  Top-p and min-p each keep a prefix
        of the ranking, and every token above a candidate is a candidate, so they
        are decided on the k values; the noise is hashed for those ids alone.  On a
        262,144-token vocabulary this skips the full sort top-p needs and the noise
        over every token: ~7 ms, not ~36 ms, a row on the CPU.  Top-p takes the
        total mass as 1 where `_full` (mlx-lm's filter) sums it over the vocabulary
        (~0.9998 in float32): a token whose mass above falls in that gap is kept by
        one and not the other."""
        keep = mx.ones(vals.shape, mx.bool_)
        if 0 < self.top_p < 1.0:  # as mlx-lm's apply_top_p: drop a token once the mass above it reaches top_p
            ascending = mx.sort(vals, axis=-1)
            above = mx.cumsum(mx.exp(ascending), axis=-1, reverse=True, inclusive=False)
            dropped = (above >= self.top_p).sum(axis=-1, keepdims=True)
            keep = vals >= mx.take_along_axis(ascending, dropped, axis=-1)
        if self.min_p:  # as apply_min_p: below min_p times the top probability
            keep = keep & (vals >= vals.max(axis=-1, keepdims=True) + math.log(self.min_p))
        x = mx.where(keep, vals, -math.inf) * (1.0 / self.temperature)
        g = -mx.log(-mx.log(uniforms_at(keys, ids)))
        return mx.take_along_axis(ids, mx.argmax(x + g, axis=-1, keepdims=True), axis=-1)[..., 0]


def _normalised(logits: mx.array) -> mx.array:
    """Log-probabilities in float32."""
    x = logits.astype(mx.float32)
    return x - ops.logsumexp(x)


def _best(lp: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ids [N, k] of each row's k largest values (in no order) and those values."""
    ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[..., :k]
    return ids, mx.take_along_axis(lp, ids, axis=-1)
