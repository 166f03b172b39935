"""Numerical building blocks, and the one place for backend-specific choices.

Model code calls these and never asks which backend it runs on.
"""

import mlx.core as mx


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def wide(dtype) -> mx.Dtype:
    """The precision for norms, softmaxes and scalars: float32, or float64 if given."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def const(value: float, dtype) -> mx.array:
    """A scalar applied at (at least) float32 precision, never rounded to bf16 first."""
    return mx.array(value, wide(dtype))


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm as Gemma 4 defines it: x_hat * w, no `1 + w`.

    Computed in float32 *including* the weight multiply, with one rounding at the
    end: `mx.fast.rms_norm` on bf16 rounds x_hat before the multiply (spec §6).
    """
    hi = wide(x.dtype)
    if x.dtype == hi:
        return mx.fast.rms_norm(x, None if weight is None else weight.astype(hi), eps)
    w = None if weight is None else weight.astype(hi)
    return mx.fast.rms_norm(x.astype(hi), w, eps).astype(x.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    return mx.compile(_gelu_tanh, shapeless=True)(x)


def _gelu_tanh(x):
    return 0.5 * x * (1 + mx.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def softcap(x: mx.array, cap: float) -> mx.array:
    x = x.astype(wide(x.dtype))
    return mx.tanh(x / cap) * cap


# Matmul attention beats MLX's fused CPU kernel on long prompts; on Metal/CUDA the
# fused kernel wins.  One switch, measured in bench/bench_attention.py.
MATMUL_ATTENTION_MIN_QUERIES = 2


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None) -> mx.array:
    """softmax(q k^T + mask) v with scale 1.0 (q/k norms replace 1/sqrt(d)).

    q: [B, nh, T, d]; k, v: [B, kv, S, d]; mask: additive or boolean, broadcastable
    to [B, nh, T, S].  GQA: query head h reads KV head h // (nh / kv).
    """
    if on_cpu() and q.shape[2] >= MATMUL_ATTENTION_MIN_QUERIES:
        return _matmul_attention(q, k, v, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


def _matmul_attention(q, k, v, mask):
    B, nh, T, d = q.shape
    kv = k.shape[1]
    g = nh // kv
    q = q.reshape(B, kv, g, T, d)
    scores = (q @ k[:, :, None].swapaxes(-1, -2)).astype(wide(q.dtype))
    if mask is not None:
        if mask.shape[1] == 1:  # [B|1, 1|nh, T, S] -> [B|1, kv|1, g|1, T, S]
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(mask.shape[0], kv, g, T, -1)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    p = mx.softmax(scores, axis=-1, precise=True).astype(v.dtype)
    out = p @ v[:, :, None]
    return out.reshape(B, nh, T, v.shape[-1])

