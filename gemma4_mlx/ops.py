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
    end: `mx.fast.rms_norm` on bf16 rounds x_hat before the multiply (docs/text-decoder.md §6).
    """
    hi = wide(x.dtype)
    if x.dtype == hi:
        return mx.fast.rms_norm(x, None if weight is None else weight.astype(hi), eps)
    w = None if weight is None else weight.astype(hi)
    return mx.fast.rms_norm(x.astype(hi), w, eps).astype(x.dtype)


@mx.compile
def _gelu_tanh(x):
    # 0.5 * x * (1 + tanh(z)) == x * sigmoid(2z) == x / (1 + exp(-2z)): the same
    # function, and in a compiled kernel exp is ~1.6x cheaper than MLX's CPU tanh.
    # The exponent is capped so exp never overflows (an inf there makes the
    # gradient NaN); past the cap the result is ~1e-33 * x, zero in effect.
    return x / (1 + mx.exp(mx.minimum(-1.5957691216057308 * (x + 0.044715 * x * x * x), 80.0)))


@mx.compile
def _geglu(g, u):
    return _gelu_tanh(g) * u


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximate GELU (`gelu_pytorch_tanh`)."""
    return _gelu_tanh(x)


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_tanh(gate) * up in one fused kernel."""
    return _geglu(gate, up)


def softcap(x: mx.array, cap: float) -> mx.array:
    x = x.astype(wide(x.dtype))
    return mx.tanh(x / cap) * cap


# A few rows (decode): the CPU BLAS streams W faster as a matrix-vector product
# W @ x^T than as x @ W^T (measured 1.1-2.7x on Gemma shapes, bench/bench_text.py).
GEMV_MAX_ROWS = 4


def linear(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for a weight stored [out, in]."""
    rows = x.size // x.shape[-1]
    if rows <= GEMV_MAX_ROWS and on_cpu():
        y = w @ x.reshape(rows, x.shape[-1]).T
        return y.T.reshape(*x.shape[:-1], w.shape[0])
    return x @ w.T


# On the CPU, attention is dominated by the softmax's exp: split long query runs
# into blocks and skip key blocks the mask rules out (sliding windows, causality).
# Metal/CUDA use the fused kernel.  Measured in bench/bench_text.py.
ATTENTION_BLOCK = 64


def attention(q: mx.array, k: mx.array, v: mx.array, mask) -> mx.array:
    """softmax(q k^T + mask) v with scale 1.0 (q/k norms replace 1/sqrt(d)).

    q: [B, nh, T, d]; k, v: [B, kv, S, d]; mask: a `cache.Mask` (boolean array
    broadcastable to [B, 1, T, S] plus its slot geometry).  GQA: query head h
    reads KV head h // (nh / kv).
    """
    if not on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask.array)
    T = q.shape[2]
    if T < 2 * ATTENTION_BLOCK:
        return _matmul_attention(q, k, v, mask.array)
    outs = []
    for a in range(0, T, ATTENTION_BLOCK):
        b = min(T, a + ATTENTION_BLOCK)
        lo, hi = mask.key_range(a, b)
        outs.append(_matmul_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], mask.array[..., a:b, lo:hi]))
    return mx.concatenate(outs, axis=2)


def _matmul_attention(q, k, v, mask):
    B, nh, T, d = q.shape
    kv = k.shape[1]
    g = nh // kv
    q = q.reshape(B, kv, g, T, d)
    scores = (q @ k[:, :, None].swapaxes(-1, -2)).astype(wide(q.dtype))
    scores = mx.where(mask[:, :, None], scores, -mx.inf)  # mask: [B|1, 1, T, S] boolean
    p = mx.softmax(scores, axis=-1, precise=True).astype(v.dtype)
    out = p @ v[:, :, None]
    return out.reshape(B, nh, T, v.shape[-1])


def moe_strategy(pairs: int, tokens: int = 1) -> str:
    """How to run `pairs` (token, expert) products of `tokens` tokens in an MoE layer.

    "gather": one gather_mm per pair (a single token: its experts are distinct).
    "sorted": pairs sorted by expert, gather_mm reads each expert once.  On a GPU
        every multi-token block (prefill, batched decode, speculative verify) takes
        it: an expert chosen by several tokens is read once (docs/speculative.md §11.4).
    "segments": CPU prefill: group on the host, one BLAS GEMM per expert; MLX's CPU
        gather_mm runs per row and is ~6x slower at prefill sizes.  Below 64 pairs
        (verify blocks) gather, sorted and segments measured within noise of each
        other on the CPU (bench/RESULTS-speculative-cpu.txt), so gather stays.
    """
    if on_cpu():
        return "gather" if pairs < 64 else "segments"
    return "sorted" if tokens > 1 else "gather"
