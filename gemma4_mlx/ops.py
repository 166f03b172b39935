"""Numerical building blocks, and the one place for backend-specific choices
(with `ops_quantized`, their quantized-weight and quantized-cache twins).

Model code calls these and never asks which backend it runs on.  Two kinds of
choice live here (docs/text-decoder.md §6.1):
- speed: which of two equal computations a backend runs faster (`cpu_branches`);
  GEMMA4_MLX_FORCE_GPU_BRANCHES=1 makes the CPU take the Metal/CUDA ones, so that
  the CPU test suite runs them too;
- kernels: where MLX's CPU backend lacks one for a dtype (`gather_mm` is float32
  only), the op is built from ops it has, accumulating in float32 and rounding
  once, as the GPU kernel does.
"""

import functools
import math
import os
import platform
import sys

import mlx.core as mx

from gemma4_mlx import cpu_exp

FORCE_GPU_BRANCHES = os.environ.get("GEMMA4_MLX_FORCE_GPU_BRANCHES", "") not in ("", "0")


def on_cpu() -> bool:
    """The backend really is the CPU (kernel availability)."""
    return mx.default_device().type == mx.DeviceType.cpu


def cpu_branches() -> bool:
    """Take the CPU-tuned branches: on the CPU backend, unless FORCE_GPU_BRANCHES
    (read at each call, so a test can flip it)."""
    return on_cpu() and not FORCE_GPU_BRANCHES


# A weight times a few rows has two BLAS forms: x @ W^T ("rows", what MLX programs
# write) and W @ x^T ("columns": the weight as the left operand).  Which streams the
# weight faster depends on the machine, not the model: on one 2-core x86 VM columns
# ran 1.1-2.7x faster per product (MoE experts 1.26-1.48x); on another (AVX-512,
# 300 MB L3) rows ran 1.1-1.6x faster, and columns made E2B-/MoE-small decode 0.97x /
# 0.82x mlx-lm's instead of 1.35x / 1.45x (docs/text-decoder.md §6.3).  So loading a checkpoint big enough to
# matter times both forms on its own weights at one row (checkpoint/cpu_forms.py) and
# keeps the faster for one row (decode of one sequence, each expert pair), per weight
# shape where a shape's weights are big enough to time apart (on the third VM below a
# wide [512, 2048] streamed 1.5x faster as columns, a tall [4096, 512] alike).  A few rows
# (2 to FEW_ROWS_MAX: batched decode, verify blocks) take rows unless
# GEMMA4_MLX_CPU_FORM=ONE,FEW says otherwise: on a third VM (AMD EPYC, AVX-512) their
# columns forms ran 1.3-1.5x ahead of rows, then 2.5-3x behind in spells a load-time
# timing cannot foresee.  Their forms: "columns" (x^T a transposed view) and
# "columns-copied" (x^T copied contiguous from GEMV_MAX_ROWS + 1 rows: what "columns"
# meant on the first VM, where the view was the slow one).  Until a load decides: rows.
CPU_FORMS = ("rows", "columns")
FEW_ROW_FORMS = ("rows", "columns", "columns-copied")
FEW_ROWS_LIKE = {"rows": "rows", "columns": "columns-copied"}  # a one-row form's few-row twin
CPU_FORM_ENV = "GEMMA4_MLX_CPU_FORM"


def _form_from_env() -> tuple[str, str] | None:
    """(one-row form, few-row form) fixed by the environment: "rows", "columns" (the
    pair columns, columns-copied) or ONE,FEW (e.g. "columns,rows"); None for auto."""
    value = os.environ.get(CPU_FORM_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    one, _, few = (part.strip() for part in value.partition(","))
    few = few or FEW_ROWS_LIKE.get(one)
    if one not in CPU_FORMS or few not in FEW_ROW_FORMS:
        raise ValueError(f"{CPU_FORM_ENV}={value!r}: expected rows, columns, ONE,FEW (e.g. columns,rows) or auto")
    return one, few


try:
    FIXED_CPU_FORM, CPU_FORM_ENV_ERROR = _form_from_env(), None
except ValueError as e:  # raised where a model loads: one line from the CLI, not an import traceback
    FIXED_CPU_FORM, CPU_FORM_ENV_ERROR = None, str(e)
_cpu_form, _few_form = FIXED_CPU_FORM or ("rows", "rows")
_shape_forms: dict[tuple[int, ...], str] = {}  # one-row forms of weight shapes timed apart


def check_cpu_form_setting() -> None:
    """Raise the environment setting's error, if it had one (the loaders call this)."""
    if CPU_FORM_ENV_ERROR:
        raise ValueError(CPU_FORM_ENV_ERROR)


def cpu_form(rows: int = 1, shape: tuple[int, ...] | None = None) -> str:
    """The product form the CPU branches take now for `rows` rows of a weight of
    `shape` [out, in]: "rows" or "columns" for one row (the shape's own form where
    the load timed its weights apart), one of FEW_ROW_FORMS for a few."""
    return _shape_forms.get(shape, _cpu_form) if rows <= 1 else _few_form


def cpu_shape_forms() -> dict[tuple[int, ...], str]:
    """The weight shapes with a one-row form of their own, and that form."""
    return dict(_shape_forms)


def set_cpu_form(form: str, few: str | None = None, shapes: dict | None = None) -> None:
    """Take `form` for one row and `few` (default: its twin in FEW_ROWS_LIKE) for a
    few rows from now on (a measured choice; tests flip it); `shapes` maps weight
    shapes to a one-row form of their own, and a call without it clears them."""
    global _cpu_form, _few_form, _shape_forms
    few = FEW_ROWS_LIKE.get(form) if few is None else few
    for f in (form, *(shapes or {}).values()):
        if f not in CPU_FORMS:
            raise ValueError(f"CPU product form {f!r}: expected one of {', '.join(CPU_FORMS)}")
    if few not in FEW_ROW_FORMS:
        raise ValueError(f"CPU few-row product form {few!r}: expected one of {', '.join(FEW_ROW_FORMS)}")
    _cpu_form, _few_form, _shape_forms = form, few, {tuple(k): f for k, f in (shapes or {}).items()}


def _columns() -> bool:
    """One row (an expert pair's GEMV too) in the columns form."""
    return cpu_branches() and _cpu_form == "columns"


# Stacking q/k/v and gate/up into one product each at load (`models/fuse.py`): one
# product instead of three (or two) per layer.  On the AVX-512 VM, rows form, decode
# ran 1.5-15 % faster stacked (E2B-/MoE-small and -shaped, float32 and 4-bit; best of
# interleaved rounds, on OpenBLAS' SSE3 kernels; with its AVX-512 ones, which `_blas`
# now picks, within +-5 % either way, the noise there); on the earlier VM, columns form,
# within 1 % (OpenBLAS streamed three GEMVs as fast as one) — never slower beyond noise,
# and one dispatch instead of three on a GPU, so it is the default.  It
# moves float32 rounding in the last bits (one BLAS call of another shape);
# GEMMA4_MLX_STACK_PROJECTIONS=0 keeps the checkpoint's modules.
STACK_PROJECTIONS = os.environ.get("GEMMA4_MLX_STACK_PROJECTIONS", "1").strip() != "0"


def stack_projections() -> bool:
    """Whether the loader stacks projections that share an input (read at each load)."""
    return STACK_PROJECTIONS


def wide(dtype) -> mx.Dtype:
    """The precision for norms, softmaxes and scalars: float32, or float64 if given."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def const(value: float, dtype) -> mx.array:
    """A scalar applied at (at least) float32 precision, never rounded to bf16 first."""
    return mx.array(value, wide(dtype))


@mx.compile
def _rms_norm_cpu(x, w, eps):
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * w


@mx.compile
def _rms_norm_cpu_unweighted(x, eps):
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)


def _rms_norm(x: mx.array, w: mx.array | None, eps: float) -> mx.array:
    # MLX's CPU backend runs `fast.rms_norm` as its unfused fallback, 9-11 ops per
    # norm; compiled, the same formula is 3 kernels (bit-identical on float32 here,
    # 1.4-2.6x faster at decode sizes; docs/text-decoder.md §6.1).
    if not cpu_branches():
        return mx.fast.rms_norm(x, w, eps)
    return _rms_norm_cpu_unweighted(x, eps) if w is None else _rms_norm_cpu(x, w, eps)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """RMSNorm as Gemma 4 defines it: x_hat * w, no `1 + w`.

    Computed in float32 *including* the weight multiply, with one rounding at the
    end: `mx.fast.rms_norm` on bf16 rounds x_hat before the multiply (docs/text-decoder.md §6).
    """
    hi = wide(x.dtype)
    w = None if weight is None else weight.astype(hi)
    if x.dtype == hi:
        return _rms_norm(x, w, eps)
    return _rms_norm(x.astype(hi), w, eps).astype(x.dtype)


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


# MLX's CPU exp (with the tanh, sigmoid and softmax built on it) runs one element
# at a time on its x86 Linux builds: ~13 ns an element, where `cpu_exp`'s compiled
# arithmetic takes 1-3 ns but three kernels instead of one (at 4096 elements GeGLU
# 131 -> 96 us, a softmax 132 -> 116; at 1024 a tie).  Decided on the row (last
# axis) length, not the element count, so that the number of rows (batch, chunk,
# verify block) does not change a row's kernels.  (An attention row's length counts
# the batch's padding slots, so a short row batched with long ones may still cross.)
# Measured on x86-64 Linux only (docs/text-decoder.md §6.5); MLX's macOS builds
# vectorise their own exp.
CPU_EXP_MIN_ROW = 512
CPU_EXP_PLATFORM = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def _use_cpu_exp(x: mx.array) -> bool:
    return (
        CPU_EXP_PLATFORM and x.ndim > 0 and x.shape[-1] >= CPU_EXP_MIN_ROW and x.dtype != mx.float64 and cpu_branches()
    )


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximate GELU (`gelu_pytorch_tanh`)."""
    return cpu_exp.gelu_tanh(x) if _use_cpu_exp(x) else _gelu_tanh(x)


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_tanh(gate) * up, fused."""
    return cpu_exp.geglu(gate, up) if _use_cpu_exp(gate) else _geglu(gate, up)


def sigmoid(x: mx.array) -> mx.array:
    return cpu_exp.sigmoid(x) if _use_cpu_exp(x) else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) (swish)."""
    return cpu_exp.silu(x) if _use_cpu_exp(x) else x * mx.sigmoid(x)


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap), in float32 (or float64)."""
    if _use_cpu_exp(x):
        return cpu_exp.softcap(x, cap)
    x = x.astype(wide(x.dtype))
    return mx.tanh(x / cap) * cap


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis, kept, in float32 (or float64)."""
    if _use_cpu_exp(x):
        return cpu_exp.logsumexp(x)
    return mx.logsumexp(x.astype(wide(x.dtype)), axis=-1, keepdims=True)


def softmax(x: mx.array) -> mx.array:
    """softmax over the last axis in float32 (or float64), max subtracted first."""
    if _use_cpu_exp(x):
        return cpu_exp.softmax(x)
    return mx.softmax(x.astype(wide(x.dtype)), axis=-1, precise=True)


# -- RoPE ---------------------------------------------------------------------
# MLX's CPU backend runs `fast.rope` as its unfused fallback, ~20 ops per call, and
# recomputes the angles in every layer.  The CPU branch computes cos/sin once per
# forward and rotation (the caller shares them across layers) and rotates in one
# compiled kernel: bit-identical to the fallback in float32 (tests/test_rope.py),
# 46 -> 15 us per decode call.


def rope_inv_freqs(dims: int, base: float | None, freqs: mx.array | None) -> mx.array:
    """Angle per position of each rotated pair, as MLX's rope derives it: 1 / freqs
    (the periods), or base^(-2i/dims) written as exp(-i * 2 ln(base) / dims)."""
    if freqs is not None:
        return 1.0 / freqs
    i = mx.arange(dims // 2, dtype=mx.float32)
    return mx.exp(-i * (2 * math.log(base) / dims))


def rope_angles(inv_freqs: mx.array, offset, T: int) -> tuple[mx.array, mx.array]:
    """cos and sin of T positions from `offset` (an int, or [B] per-row offsets):
    [T, dims/2], or [B, 1, T, dims/2]."""
    pos = mx.arange(T, dtype=mx.float32)
    if isinstance(offset, mx.array) and offset.ndim:
        theta = (pos + offset.astype(mx.float32)[:, None])[:, None, :, None] * inv_freqs
    else:
        theta = (pos + offset)[:, None] * inv_freqs
    return mx.cos(theta), mx.sin(theta)


@mx.compile
def _rotate_half(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope(x: mx.array, offset, *, base: float | None, freqs: mx.array | None, angles) -> mx.array:
    """Rotate-half RoPE over all of x's last dim ([B, heads, T, d]) at positions
    offset.. (`freqs`: periods per pair, or `base`).  angles: a function returning
    `rope_angles(...)` for these positions, memoized by the caller; only the CPU
    branch calls it."""
    if not cpu_branches():
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=base, scale=1.0, offset=offset, freqs=freqs)
    return _rotate_half(x, *angles())


# A few rows (batched decode, verify blocks) in a "columns" form (see CPU_FORMS):
# W @ x^T.  On the first VM, from 4 rows OpenBLAS took a slow path when x^T was a
# transposed view (W [4096, 1024]: 3.5 ms against 1.9 ms for x @ W^T), so there x^T
# is first copied contiguous ("columns-copied"): in the model, E2B-shaped decode steps
# went 393 -> 328 ms at B = 4 and 419 -> 370 ms at B = 8, MoE-shaped 330 -> 308 and
# 457 -> 440 (bench/RESULTS-batch-cpu.txt).  A vocabulary-sized head (far taller than
# wide) measured slower in either columns form, so it keeps x @ W^T from 4 rows.
GEMV_MAX_ROWS = 3
FEW_ROWS_MAX = 8
FEW_ROWS_MAX_ASPECT = 16  # out / in above this: a head, not a layer


def linear(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for a weight stored [out, in]."""
    rows = x.size // x.shape[-1]
    if rows > FEW_ROWS_MAX or not cpu_branches() or cpu_form(rows, w.shape) == "rows":
        return x @ w.T
    if rows == 1:  # a column already: no transposes (same product, bit for bit)
        return (w @ x.reshape(-1, 1)).reshape(*x.shape[:-1], w.shape[0])
    xt = x.reshape(rows, x.shape[-1]).T
    if rows > GEMV_MAX_ROWS:
        if w.shape[0] > FEW_ROWS_MAX_ASPECT * w.shape[1]:
            return x @ w.T
        if _few_form == "columns-copied":
            xt = mx.contiguous(xt)
    return (w @ xt).T.reshape(*x.shape[:-1], w.shape[0])


def after(x: mx.array, outs: list) -> mx.array:
    """x, made to wait for the last of `outs` (the previous block's output), if any.
    MLX evaluates independent blocks side by side; chained, one block's temporaries
    (a dequantized weight block, an attention block's scores) are alive at a time."""
    return mx.depends(x, outs[-1]) if outs else x


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
    if not cpu_branches():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask.array)
    return float_attention([q], [k], v, mask)


def float_attention(qs: list, ks: list, v: mx.array, mask) -> mx.array:
    """The CPU's attention with scores summed over terms q_i k_i^T (one term, or two
    for split K = V keys, docs/kv-cache.md §7).  Long query runs go in blocks of 64
    that skip key blocks the mask rules out (the softmax's exp is the cost there)."""
    T = qs[0].shape[2]
    if T < 2 * ATTENTION_BLOCK:
        return _matmul_attention(qs, ks, v, mask.array)

    def block(a, b, lo, hi, wait):
        qb = [wait(q[:, :, a:b]) for q in qs]
        return _matmul_attention(qb, [k[:, :, lo:hi] for k in ks], v[:, :, lo:hi], mask.array[..., a:b, lo:hi])

    return in_blocks(T, mask, block)


def in_blocks(T: int, mask, block) -> mx.array:
    """A long query run in blocks of ATTENTION_BLOCK queries, each over the keys
    [lo, hi) the mask lets it see: `block(a, b, lo, hi, wait)` for queries a..b-1,
    which passes its queries through `wait`.  That makes a block wait for the
    previous block's output: MLX would otherwise evaluate the independent blocks side
    by side, holding every block's [heads, 64, S] scores at once (a prefill chunk's
    whole score tensor: 2 GiB for the 31B shape at 32K in float32)."""
    return query_blocks(T, ATTENTION_BLOCK, lambda a, b, wait: block(a, b, *mask.key_range(a, b), wait))


def query_blocks(T: int, size: int, run) -> mx.array:
    """run(a, b, wait) for the query blocks [a, b) of `size` (one block when T <= size),
    concatenated on axis 2; a block that passes its queries through `wait` waits for
    the block before it (`after`)."""
    if T <= size:
        return run(0, T, lambda x: x)
    outs = []
    for a in range(0, T, size):
        outs.append(run(a, min(T, a + size), lambda x: after(x, outs)))
    return mx.concatenate(outs, axis=2)


def _matmul_attention(qs: list, ks: list, v, mask):
    B, nh, T, _ = qs[0].shape
    kv, S = ks[0].shape[1], ks[0].shape[2]
    g = nh // kv
    scores = None
    for q, k in zip(qs, ks):
        # A KV head's query group as the rows of one product: broadcasting K/V over the
        # group instead makes MLX's CPU matmul copy them per query head (measured at
        # decode, 8 heads on 512 keys: scores 54 -> 42 us, p @ V 61 -> 31 us).
        s = (q.reshape(B, kv, g * T, q.shape[-1]) @ k.swapaxes(-1, -2)).astype(wide(q.dtype))
        scores = s if scores is None else scores + s  # terms summed in float32
    scores = mx.where(mask[:, :, None], scores.reshape(B, kv, g, T, S), -mx.inf)  # mask: [B|1, 1, T, S]
    out = softmax_times(scores.reshape(B, kv, g * T, S), v)
    return out.reshape(B, nh, T, v.shape[-1])


def softmax_times(scores: mx.array, v: mx.array) -> mx.array:
    """softmax(scores) @ v over the last axis of float32 scores.  With cpu_exp and
    float32 values, the rows are normalised after the product, on its smaller output
    (one pass over the scores fewer); other dtypes round the probabilities first."""
    if v.dtype == mx.float32 and _use_cpu_exp(scores):
        e, inv = cpu_exp.exp_rows(scores)
        return (e @ v) * inv
    return softmax(scores).astype(v.dtype) @ v


# Pairs per expert from which the CPU runs one GEMM per expert, by product form: in
# "columns" the sorted GEMVs kept up to 8 (below); in "rows" MLX's per-row kernel
# lost to the GEMMs from 2 (16-token blocks: E 32 184 -> 142 ms, E 64 1465 -> 1165).
CPU_SEGMENTS_PAIRS_PER_EXPERT = {"rows": 2, "columns": 8}


def moe_strategy(pairs: int, tokens: int = 1, experts: int = 16) -> str:
    """How to run `pairs` (token, expert) products of `tokens` tokens in an MoE layer
    of `experts` experts.

    "gather": one gather_mm per pair (a single token: its experts are distinct); in
        the CPU's "columns" form one GEMV per pair (`_gather_columns`).
    "sorted": pairs sorted by expert, gather_mm reads each expert once.  On a GPU
        every multi-token block (prefill, batched decode, speculative verify) takes
        it: an expert chosen by several tokens is read once (docs/speculative.md §11.4).
        On the CPU too below CPU_SEGMENTS_PAIRS_PER_EXPERT pairs per expert: in the
        columns form one GEMV per pair, an expert's pairs in a row, so its weights are
        still in cache for the next (gather took 1.1-2.5x as long at 8-64 tokens;
        docs/text-decoder.md §6.2).
    "segments": CPU prefill: group on the host, one BLAS GEMM per expert; MLX's CPU
        gather_mm runs per row and is ~6x slower at prefill sizes.  Sorted GEMVs
        win while experts get few rows each: the crossover measured at 8-16 pairs
        per expert (E 32: about equal at 16; E 64: GEMVs ahead at 8; E 128 / H 2816:
        GEMVs ahead at 4, GEMMs 2.3x ahead at 16).
    """
    if cpu_branches() and pairs >= CPU_SEGMENTS_PAIRS_PER_EXPERT[_cpu_form] * experts:
        return "segments"
    return "sorted" if tokens > 1 else "gather"


# CPU fallback for `gather_mm` in bf16/f16: widening the gathered experts to float32
# (BLAS) wins while the float32 copies stay in cache; past ~16 MB of them MLX's
# bf16/f16 matmul, which reads the stored experts directly, wins (2-3x each side of
# the cliff, measured at 8 experts of 0.26-2 M weights, docs/text-decoder.md §6.1).
WIDEN_MAX_ELEMENTS = 1 << 22


def gather_mm(x: mx.array, w: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
    """x @ w[idx] per batch entry (`mx.gather_mm` with rhs_indices only).

    x: [..., M, in] whose batch dims broadcast with idx; w: [E, in, out] (in the
    model, a transposed view of experts stored [E, out, in]).  Where MLX's CPU
    backend has no `gather_mm` kernel for the dtype (0.32: float32 only), the
    selected experts are gathered in their stored layout and multiplied as
    matrix-vector products, accumulating in float32 and rounding once as the GPU
    kernel does: widened to float32 when small, else by MLX's bf16/f16 matmul
    (which accumulates in float32).
    """
    if not on_cpu() or _cpu_gather_mm(mx.result_type(x, w)):
        if _columns() and x.shape[-2] == 1:
            return _gather_columns(x, w, idx)
        return mx.gather_mm(x, w, rhs_indices=idx, sorted_indices=sorted_indices)
    out = mx.result_type(x, w)
    sel = mx.take(w.swapaxes(-1, -2), idx, axis=0)  # [..., out, in]: the stored rows
    if idx.size * w.shape[-1] * w.shape[-2] <= WIDEN_MAX_ELEMENTS:
        hi = wide(out)
        return (sel.astype(hi) @ x.astype(hi).swapaxes(-1, -2)).swapaxes(-1, -2).astype(out)
    return (sel @ x.swapaxes(-1, -2)).swapaxes(-1, -2)


def _gather_columns(x: mx.array, w: mx.array, idx: mx.array) -> mx.array:
    """One row per pair in the CPU's "columns" form: each expert as the left operand,
    stored [out, in], times its row as a column (`linear`'s one-row rule, per pair).
    The same product up to float32 summation order; where columns win, the expert
    GEMVs of 12 MoE layers at 1-8 tokens ran 1.26-1.48x faster than row @ w[e]
    (docs/text-decoder.md §6.2)."""
    return mx.gather_mm(w.swapaxes(-1, -2), x.swapaxes(-1, -2), lhs_indices=idx).swapaxes(-1, -2)


@functools.cache
def _cpu_gather_mm(dtype: mx.Dtype) -> bool:
    """Whether MLX's CPU backend has a `gather_mm` kernel for dtype (asked once)."""
    try:
        one = mx.ones((1, 1, 1), dtype)
        mx.eval(mx.gather_mm(one, one, rhs_indices=mx.zeros((1,), mx.uint32), stream=mx.cpu))
        return True
    except (RuntimeError, ValueError):
        return False
