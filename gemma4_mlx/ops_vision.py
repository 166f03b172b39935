"""The vision tower's attention: bidirectional over one image's patches.

Its backend choice lives here, beside `ops` (whose softmax it uses): on the CPU,
MLX's fused attention kernel is its unfused fallback with MLX's slow exp, so the
CPU branch builds it from two products and `ops.softmax_times` in blocks of
queries; Metal and CUDA keep the fused kernel.
"""

import mlx.core as mx

from gemma4_mlx import ops

# Score elements per block of an unmasked attention on the CPU: 8 MB of float32
# scores, and the softmax's intermediates of that size, at a time.  An E2B image of
# 2,394 patches (12 heads): 2^16 953 ms a layer, 2^18 727, 2^20 677, 2^21 634, 2^22
# 694, 2^24 1034; MLX's fused kernel (its CPU fallback) 1089.  Metal/CUDA run their
# fused kernel per GPU_QUERY_BLOCK queries.
UNMASKED_BLOCK_SCORES = 1 << 21
GPU_QUERY_BLOCK = 1024


def unmasked_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """softmax(q k^T) v with scale 1.0, every query seeing every key (an image's
    patches): q [B, nh, T, d], k/v [B, kv, S, d].  Blocks of queries bound the score
    matrix (a 1120-token image has 9,576 patches); each query's row is independent,
    so the blocks change nothing.  On the CPU MLX's fused kernel is its unfused
    fallback with MLX's exp (docs/text-decoder.md §6.5): this builds it from
    products and `ops.softmax_times`."""
    T, S = q.shape[2], k.shape[2]
    if not ops.cpu_branches():
        sdpa = mx.fast.scaled_dot_product_attention
        return ops.query_blocks(T, GPU_QUERY_BLOCK, lambda a, b, _: sdpa(q[:, :, a:b], k, v, scale=1.0))
    B, nh, _, d = q.shape
    kv = k.shape[1]
    g = nh // kv
    block = max(1, UNMASKED_BLOCK_SCORES // max(1, B * nh * S))
    # Every block reads all of K and V: copied once here if they are views (the
    # tower's are transposed), not once per block (9,576 patches: 42.7 -> 10.1 s a layer).
    k, v = mx.contiguous(k), mx.contiguous(v)

    def one(a, b, wait):
        qb = wait(q[:, :, a:b]).reshape(B, kv, g * (b - a), d)
        scores = (qb @ k.swapaxes(-1, -2)).astype(ops.wide(q.dtype))
        return ops.softmax_times(scores, v).reshape(B, nh, b - a, v.shape[-1])

    return ops.query_blocks(T, block, one)
