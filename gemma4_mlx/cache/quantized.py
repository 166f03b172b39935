"""Quantized K/V entries (docs/kv-cache.md).

A layer cache stores its keys and its values each as one *buffer*: a float array
[B, H, S, D], or with `kv_bits` 8 or 4 the triple `mx.quantize` gives (packed uint32
codes, scales, biases), each [B, H, S, ...].  Every component has the slot axis at
position 2 and quantization groups run along the last (head) axis only, so one
slot's entry never depends on another slot: every slot operation of a cache (trim,
roll, filter, snapshot/restore, rows joining and leaving) moves the three
components together and stays exact on the quantized representation.  The slot
helpers here take either form and do on a float array exactly what the cache did
before quantization existed.

Group size (docs/kv-cache.md §2): 64 along the head dim when it divides it (Gemma 4's
head dims are 256 and 512), else 32.  Head dims that are not a multiple of 32 (only
tiny test configs) are zero-padded to one; the queries are padded the same way, so
the padding adds nothing to a score, and the padded value columns are cut off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from gemma4_mlx import ops, ops_quantized

KV_BITS = (16, 8, 4)  # 16: the model's float dtype (no quantization)
MIN_GROUP = 32  # the smallest group `mx.quantize` supports


def check_bits(kv_bits: int | None) -> int | None:
    """The quantization width for a `kv_bits` setting: None (16 or None: float K/V), 8 or 4."""
    if kv_bits is None or kv_bits == 16:
        return None
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    return int(kv_bits)


def layout(head_dim: int) -> tuple[int, int]:
    """(group size, stored head dim) for K/V rows of `head_dim` values."""
    padded = -(-head_dim // MIN_GROUP) * MIN_GROUP
    return (64 if padded % 64 == 0 else MIN_GROUP), padded


def encode(x: mx.array, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """K or V [..., D] as (codes, scales, biases), groups along D."""
    group, padded = layout(x.shape[-1])
    if padded != x.shape[-1]:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - x.shape[-1])])
    return tuple(mx.quantize(x, group_size=group, bits=bits))


def params(buf: tuple, head_dim: int) -> tuple[int, int, int]:
    """(group size, bits, stored head dim) of a quantized buffer holding `head_dim`-wide rows."""
    group, padded = layout(head_dim)
    codes, scales, _ = buf
    bits = codes.shape[-1] * 32 // padded
    if bits not in (4, 8) or scales.shape[-1] * group != padded:
        raise ValueError(f"quantized K/V of shape {codes.shape} / {scales.shape} does not hold {head_dim}-wide rows")
    return group, bits, padded


def decode(buf, head_dim: int) -> mx.array:
    """The float K or V a buffer stands for (a float buffer is returned as is)."""
    if not isinstance(buf, tuple):
        return buf
    group, bits, _ = params(buf, head_dim)
    return mx.dequantize(*buf, group_size=group, bits=bits)[..., :head_dim]


class KeySplit:
    """How a quantized cache keeps a K = V layer's keys (docs/kv-cache.md §7).

    There K = rope(raw_hat * w) and V = raw_hat (raw_hat: the RMS-normalised shared
    projection).  On the dims RoPE leaves alone K is w * V, so only the rotated
    dims (`dims`, 128 of 512 on Gemma 4's full layers) get a key buffer; scores add
    q_rot . K_rot and (q * scale) . V, where `scale` is w on the unrotated dims and 0
    on the rotated ones (whose V must not count twice).
    """

    def __init__(self, dims: Sequence[int], weight: mx.array, head_dim: int):
        self.dims = mx.array(list(dims), dtype=mx.int32)
        self.width = len(dims)
        rotated = np.zeros(head_dim, dtype=bool)
        rotated[list(dims)] = True
        self.scale = mx.where(mx.array(rotated), mx.array(0, weight.dtype), weight)

    def keys(self, k: mx.array) -> mx.array:
        """The part of full keys [..., head_dim] the cache stores."""
        return mx.take(k, self.dims, axis=-1)


class SplitKeys:
    """A K = V layer's keys as the cache hands them to attention: the rotated dims'
    buffer and the `KeySplit` that says how to score the rest from the values.
    Deliberately not a tuple (a tuple is a quantized triple here)."""

    def __init__(self, rotated, split: KeySplit):
        self.rotated, self.split = rotated, split


def attention(q: mx.array, k, v, mask) -> mx.array:
    """`ops.attention` for K/V read from a cache: quantized triples (and split keys)
    go through `ops_quantized.quantized_attention` (a decode step never dequantizes the cache;
    docs/kv-cache.md §3 for the CPU's long runs), floats as before."""
    if not isinstance(k, (tuple, SplitKeys)):
        return ops.attention(q, k, v, mask)
    d = q.shape[-1]
    if isinstance(k, SplitKeys):
        s = k.split
        q_pass = (q.astype(ops.wide(q.dtype)) * s.scale.astype(ops.wide(q.dtype))).astype(q.dtype)
        terms = [_term(mx.take(q, s.dims, axis=-1), k.rotated), _term(q_pass, v)]
    else:
        terms = [_term(q, k)]
    group, bits, _ = params(v, d)
    out = ops_quantized.quantized_attention(terms, (v, group, bits), mask)
    return out[..., :d] if out.shape[-1] != d else out


def _term(q: mx.array, buf: tuple) -> tuple:
    """(queries zero-padded to the buffer's stored width, buffer, group size, bits)."""
    d = q.shape[-1]
    group, bits, padded = params(buf, d)
    if padded != d:
        q = mx.pad(q, [(0, 0)] * 3 + [(0, padded - d)])
    return q, buf, group, bits


# -- slot operations on a buffer (an array or a quantized triple) --------------------
def tmap(fn: Callable[[mx.array], mx.array], buf):
    """fn applied to the array, or to each component of a triple."""
    return tuple(fn(t) for t in buf) if isinstance(buf, tuple) else fn(buf)


def first(buf) -> mx.array:
    return buf[0] if isinstance(buf, tuple) else buf


def length(buf) -> int:
    """Slots the buffer spans (axis 2)."""
    return first(buf).shape[2]


def batch(buf) -> int:
    return first(buf).shape[0]


def slots(buf, a: int, b: int | None = None):
    """Slots a..b-1 (lazy slices)."""
    return tmap(lambda t: t[..., a:b, :], buf)


def put(buf, a: int, x) -> None:
    """Write x into slots a.. of buf, in place."""
    if isinstance(buf, tuple):
        for t, y in zip(buf, x):
            t[..., a : a + y.shape[2], :] = y
    else:
        buf[..., a : a + x.shape[2], :] = x


def put_row(buf, row: int, a: int, x) -> None:
    """Write x (one row) into slots a.. of row `row` of buf, in place."""
    for t, y in zip(buf, x) if isinstance(buf, tuple) else ((buf, x),):
        t[row : row + 1, :, a : a + y.shape[2], :] = y


def zeros(like, cap: int):
    """An all-zero buffer of `cap` slots shaped like `like` on every other axis."""
    return tmap(lambda t: mx.zeros((t.shape[0], t.shape[1], cap, t.shape[3]), t.dtype), like)


def pad_front(buf, n: int):
    """n zero slots before the buffer's (their keys are masked wherever they are read)."""
    if not n:
        return buf
    return tmap(lambda t: mx.concatenate([mx.zeros((t.shape[0], t.shape[1], n, t.shape[3]), t.dtype), t], axis=2), buf)


def concat_rows(bufs: Sequence):
    """Buffers with equal slot spans stacked along the batch axis."""
    if isinstance(bufs[0], tuple):
        return tuple(mx.concatenate(list(parts)) for parts in zip(*bufs))
    return mx.concatenate(list(bufs))


def nbytes(buf) -> int:
    return sum(t.nbytes for t in buf) if isinstance(buf, tuple) else buf.nbytes
