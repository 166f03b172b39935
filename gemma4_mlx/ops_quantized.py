"""Backend choices for quantized weights and a quantized KV cache.

The products MLX runs on packed codes (`quantized_matmul`) have CPU kernels that
cost about one dequantization of the matrix per input row, so the CPU branches
(`ops.cpu_branches`) dequantize to float32 once from a few rows on and hand the
product to BLAS; Metal and CUDA keep MLX's kernels.  Split from `ops` (the float
ops and the backend switch live there) to keep each module small.
"""

import dataclasses
import math

import mlx.core as mx

from gemma4_mlx import ops

# MLX's CPU `quantized_matmul` costs about one dequantization of its matrix per
# input row (mxfp4/nvfp4 excepted: a fast kernel and a slow dequantize).  From this
# many rows on (prefill, batched decode, verify blocks) the CPU dequantizes the
# weight to float32 in blocks of rows and multiplies with BLAS: the crossovers were
# measured at [4096, 1024] (bench/bench_quantized_linear.py); a mode not listed
# keeps the kernel.
CPU_DEQUANT_ROWS = {"affine": 6, "mxfp8": 2, "mxfp4": 28, "nvfp4": 28}
UNPACKED_DEQUANT_ROWS = 3  # affine 4/8-bit, float32 scales: the cheaper `_dequantize_f32` unpack
DEQUANT_BLOCK = 1 << 23  # weights dequantized at a time: 32 MiB of float32


def quantized_linear(x: mx.array, w: mx.array, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    """x @ W.T for a quantized [out, in] weight: codes `w`, `scales`, affine `biases`
    (or None).  On the CPU's dequantized path the result is float32 whatever x's
    dtype (BLAS; MLX's CPU kernel accumulates bf16 inputs in bf16): callers cast."""
    rows = x.size // x.shape[-1]
    if ops.cpu_branches() and rows >= _first_dequantized_row(scales, biases, bits, mode):
        return _dequantized_linear(x.astype(mx.float32), w, scales, biases, group_size, bits, mode)
    return mx.quantized_matmul(
        x, w, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def _first_dequantized_row(scales, biases, bits: int, mode: str) -> float:
    """The row count from which the CPU takes the dequantized path for this weight."""
    return UNPACKED_DEQUANT_ROWS if _unpackable(scales, biases, bits, mode) else CPU_DEQUANT_ROWS.get(mode, math.inf)


def _dequantized_linear(x, w, scales, biases, group_size, bits, mode) -> mx.array:
    """The weight's rows in blocks of DEQUANT_BLOCK weights, each dequantized only
    after the previous block's product (`ops.after`): one block's float32 copy is
    alive at a time, not the whole matrix (a 262K-row head is 1 GiB in float32)."""
    step = max(1, DEQUANT_BLOCK // x.shape[-1])
    outs = []
    for lo in range(0, w.shape[0], step):
        codes, scale_rows, bias_rows = (t if t is None else t[lo : lo + step] for t in (w, scales, biases))
        wf = _dequantize_f32(ops.after(codes, outs), scale_rows, bias_rows, group_size, bits, mode)
        outs.append(ops.linear(x, wf))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def float32_affine(scales: mx.array, biases, mode: str):
    """Affine scales and biases in float32 (the values they hold, exactly): what
    dequantizing to float32 multiplies with."""
    if mode != "affine":
        return scales, biases
    return tuple(t if t is None or t.dtype == mx.float32 else t.astype(mx.float32) for t in (scales, biases))


def _unpackable(scales, biases, bits: int, mode: str) -> bool:
    """Affine 4- or 8-bit codes with float32 scales and biases (`_dequantize_f32`)."""
    f32 = scales.dtype == mx.float32 and getattr(biases, "dtype", None) == mx.float32
    return mode == "affine" and bits in (4, 8) and f32


def _dequantize_f32(w, scales, biases, group_size: int, bits: int, mode: str) -> mx.array:
    """`mx.dequantize` to float32.  Affine 4- and 8-bit codes with float32 scales are
    unpacked with whole-array shifts instead: the same values (q * scale + bias in
    float32, bit for bit) at less than half the time of MLX's CPU dequantize, which
    moves the crossover from 6 rows to 3 (bench/RESULTS-qlinear-cpu.txt).  bf16/fp16
    affine scales and biases are widened first: `mx.dequantize` would round each
    weight to their dtype, where the one-row kernel (`quantized_matmul`) computes
    q * scale + bias in float32 — so a prompt and its decode read the same weights
    (GGUF's fp16 d and m are exact values of ggml's, docs/quantization.md §4)."""
    scales, biases = float32_affine(scales, biases, mode)
    if not _unpackable(scales, biases, bits, mode):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    codes = (w[..., None] >> mx.arange(0, 32, bits, dtype=mx.uint32)) & ((1 << bits) - 1)
    q = codes.reshape(*w.shape[:-1], -1, group_size).astype(mx.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)


# On the CPU, query runs longer than this over quantized K/V dequantize what they read
# (`_dequantized_run_attention`): above any verify block of the auto draft length
# (k_max 7: 8 queries), so decode steps and verify blocks keep the quantized products.
CPU_DEQUANT_QUERIES = 16


def quantized_attention(terms: list[tuple], v: tuple, mask) -> mx.array:
    """`attention` over K/V stored as `mx.quantize` triples (codes, scales, biases),
    groups along the head dim (docs/kv-cache.md §3).

    terms: the score products, each (queries [B, nh, T, d_i], a quantized triple
    [B, kv, S, ...] read as keys, group size, bits); one for ordinary keys, two for
    a K = V layer whose unrotated key dims are read from the values (§7).  v: (triple,
    group size, bits).  Scores are the sum of `quantized_matmul(q_i, K_i, transpose=True)`
    and the output `quantized_matmul(p, V)`: a decode step never dequantizes the
    cache.  MLX's fused SDPA takes no quantized K/V, so every backend runs this; long
    query runs go in blocks that skip key blocks the mask rules out (on a GPU also
    to bound the [T, S] score tensor).  The CPU's exception: runs of more than
    CPU_DEQUANT_QUERIES queries (prefill chunks) dequantize the keys they may see.
    """
    T = terms[0][0].shape[2]
    if ops.cpu_branches() and T > CPU_DEQUANT_QUERIES:
        return _dequantized_run_attention(terms, v, mask)
    if T < 2 * ops.ATTENTION_BLOCK:
        return _quantized_attention(terms, v, mask.array)

    def block(a, b, lo, hi, wait):
        def keys(x):
            return tuple(t[:, :, lo:hi] for t in x)

        cut = [(wait(q[:, :, a:b]), keys(k), g, n) for q, k, g, n in terms]
        return _quantized_attention(cut, (keys(v[0]), *v[1:]), mask.array[..., a:b, lo:hi])

    return ops.in_blocks(T, mask, block)


def _dequantized_run_attention(terms, v, mask) -> mx.array:
    """A long query run (a prefill chunk) on the CPU: MLX's CPU `quantized_matmul`
    costs about a dequantization of its matrix per query row, so the run dequantizes
    the keys and values it may see once and takes the float path (docs/kv-cache.md
    §3).  Values read as keys too (split K = V keys) are dequantized once."""
    lo, hi = mask.key_range(0, terms[0][0].shape[2])

    def floats(buf, group, bits):
        return mx.dequantize(*(t[:, :, lo:hi] for t in buf), group_size=group, bits=bits)

    values = floats(*v)
    keys = [values if buf is v[0] else floats(buf, group, bits) for _, buf, group, bits in terms]
    seen = dataclasses.replace(mask, array=mask.array[..., lo:hi], k_start=mask.k_start + lo)
    return ops.float_attention([t[0] for t in terms], keys, values, seen)


def _quantized_attention(terms, v, mask):
    B, nh, T, _ = terms[0][0].shape
    kv, S = terms[0][1][0].shape[1], terms[0][1][0].shape[2]
    g = nh // kv
    hi = ops.wide(terms[0][0].dtype)
    scores = None
    for q, k, group, bits in terms:
        # A KV head's whole query group as the rows of one product: no broadcast K/V
        # (a broadcast operand made MLX's CPU kernel ~1.3x slower at decode).
        s = mx.quantized_matmul(q.reshape(B, kv, g * T, q.shape[-1]), *k, transpose=True, group_size=group, bits=bits)
        s = s.astype(hi)  # terms are summed in float32, as the softmax reads them
        scores = s if scores is None else scores + s
    scores = mx.where(mask[:, :, None], scores.reshape(B, kv, g, T, S), -mx.inf)
    p = ops.softmax(scores).astype(terms[0][0].dtype).reshape(B, kv, g * T, S)
    values, group, bits = v
    out = mx.quantized_matmul(p, *values, transpose=False, group_size=group, bits=bits)
    return out.reshape(B, nh, T, out.shape[-1])
