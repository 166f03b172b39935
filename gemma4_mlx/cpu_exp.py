"""exp, and what Gemma 4 builds on it, as plain arithmetic for MLX's CPU backend.

MLX's CPU exp runs its polynomial one element at a time on x86 Linux builds (the
wheel's SIMD width there is 1, and each element calls libm's floor and fma): about
13 ns per element against 0.3 ns for a multiply.  Its softmax, tanh and sigmoid
pay the same.  Prefill paid it twice: in the GeGLU of every MLP (a 1024-token
chunk of an E2B-shaped layer: 54 ms beside 130 ms of products) and in the
attention softmax (60-75 % of the CPU attention).  Decode pays it in the final
logit softcap (4 ms per token at a 262144-word vocabulary).

Here the same Cephes polynomial (2**f on [-1/2, 1/2], then the exponent written
into the float's bits) is written as MLX arithmetic inside compiled functions:
MLX's CPU compiler turns each into one loop the C++ compiler vectorises.  The bit
step is a `view`, which ends a fused kernel, so an exp is three kernels: worth it
on rows of some hundreds of elements (`ops` decides where it is used,
docs/text-decoder.md §6.5).  Accuracy against float64 exp of the float32
argument: within 3e-7 + |x| 2^-23 relative on [-87, 88] (the second term is
x log2(e) rounded in float32, which MLX's exp pays alike: both measure 3.9e-6 at
the ends); exactly 0 below -87.7 and for -inf; inf above 88.7; NaN stays NaN.
Everything is computed in float32 and rounded once to the input's dtype.  The
kernels are compiled shapeless (one trace for every shape: a decode step's
attention scores grow by a key each token) and differentiate (`_exp2`'s vjp).
"""

import mlx.core as mx

LOG2E = 1.4426950408889634
# Adding 1.5 * 2**23 to a float32 of magnitude below 2**22 rounds it to an integer
# (round half to even); subtracting it again gives that integer as a float.
_ROUND = 12582912.0
_LN2 = 0.6931471805599453
_EXP_MAX = 88.72283935546875  # the largest float32 x with a finite exp(x) is just below
# 2**f = 1 + f q(f) for f in [-1/2, 1/2] (Cephes' coefficients of q, constant
# first).  Keeping f q(f) apart from the 1 gives exp(x) - 1 to full relative
# precision near x = 0 as well (tanh needs it there).
_EXP2M1_POLY = (
    6.931472028550421e-1,
    2.402264791363012e-1,
    5.550332471162809e-2,
    9.618437357674640e-3,
    1.339887440266574e-3,
    1.535336188319500e-4,
)


# How the kernels are cut.  GCC vectorises a compiled loop only if every select in
# it comes after the arithmetic (a select feeding arithmetic leaves a branch it does
# not convert: "control flow in loop"), and MLX fuses ops at most 11 deep.  So an
# exp is three compiled functions, called apart so that MLX cannot fuse them:
#   1. the caller's arithmetic, ending in the clamp of t = x log2(e) to >= -127
#      (below t = -126.5 the exponent field written in 2. is 0, so the result is
#      exactly 0, exp(-inf) included; a NaN passes the comparison and stays NaN);
#   2. `_exp2_parts`: t -> (fq, bits) with 2**t = view(bits, float32) * (1 + fq);
#   3. the caller's arithmetic on those.
# Callers keep t <= 127: softmax and tanh pass arguments <= 0, GELU caps its own,
# sigmoid and `exp` clamp above too (`exp` then writes inf past 88.72 itself).
def _kernel(fn):
    """A compiled elementwise kernel: one trace for every shape of its inputs."""
    return mx.compile(fn, shapeless=True)


def _clamp_low(t: mx.array) -> mx.array:
    return mx.where(t < -127.0, -127.0, t)


def _clamp(t: mx.array) -> mx.array:
    return mx.where(t > 127.0, 127.0, _clamp_low(t))


@_kernel
def _exp2_parts(t):
    n = (t + _ROUND) - _ROUND
    f = t - n
    a = _EXP2M1_POLY
    f2 = f * f  # Estrin's scheme: Horner's would be 12 ops deep
    q = (a[0] + a[1] * f) + (a[2] + a[3] * f) * f2 + (a[4] + a[5] * f) * (f2 * f2)
    # A NaN t converts to an unspecified integer here; fq is NaN, so is the result.
    return f * q, (n.astype(mx.int32) + 127) << 23


@mx.custom_function
def _exp2(t: mx.array) -> tuple[mx.array, mx.array]:
    """2**t from a clamped float32 t (stage 1, done by the caller) as (scale, fq):
    2**t = scale * (1 + fq) = scale + scale * fq, scale a power of two."""
    fq, bits = _exp2_parts(t)
    return mx.view(bits, mx.float32), fq


@_exp2.vjp
def _exp2_vjp(t, cotangents, outputs):
    # scale is a step function of t (derivative 0 where it is defined), so all of
    # d(2**t)/dt = ln2 * 2**t goes through fq: d fq / dt = ln2 (1 + fq).
    _, d_fq = cotangents
    _, fq = outputs
    return d_fq * (_LN2 * (1 + fq))


@_kernel
def _exp_stage1(x):
    return _clamp(x.astype(mx.float32) * LOG2E)


@_kernel
def _exp_finish(x, scale, fq):
    return mx.where(x > _EXP_MAX, mx.inf, scale + scale * fq)


def exp(x: mx.array) -> mx.array:
    """exp(x) in float32."""
    return _exp_finish(x, *_exp2(_exp_stage1(x)))


@_kernel
def _gelu_stage1(x):
    # 0.5 x (1 + tanh(z)) == x / (1 + exp(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3);
    # -2z is capped at 80 so that exp never overflows.
    xf = x.astype(mx.float32)
    t = (-1.5957691216057308 * LOG2E) * (xf + 0.044715 * xf * xf * xf)
    return _clamp_low(mx.where(t > 80 * LOG2E, 80 * LOG2E, t))


@_kernel
def _over_one_plus(x, scale, fq):
    """x / (1 + 2**t) from 2**t's parts: GELU's and SiLU's last step."""
    return (x.astype(mx.float32) / (1 + (scale + scale * fq))).astype(x.dtype)


@_kernel
def _geglu_finish(g, u, scale, fq):
    return (g.astype(mx.float32) / (1 + (scale + scale * fq)) * u.astype(mx.float32)).astype(u.dtype)


def gelu_tanh(x: mx.array) -> mx.array:
    return _over_one_plus(x, *_exp2(_gelu_stage1(x)))


def geglu(g: mx.array, u: mx.array) -> mx.array:
    """gelu_tanh(g) * u, computed in float32, rounded once to u's dtype."""
    return _geglu_finish(g, u, *_exp2(_gelu_stage1(g)))


@_kernel
def _sigmoid_stage1(x):
    # exp(-x), clamped on both sides: below x = -88 the result is then
    # 1 / (1 + 2^127) = 5.9e-39, where the true value is smaller still.
    return _clamp((-LOG2E) * x.astype(mx.float32))


@_kernel
def _sigmoid_finish(x, scale, fq):
    return (1 / (1 + (scale + scale * fq))).astype(x.dtype)


def sigmoid(x: mx.array) -> mx.array:
    return _sigmoid_finish(x, *_exp2(_sigmoid_stage1(x)))


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _over_one_plus(x, *_exp2(_sigmoid_stage1(x)))


@_kernel
def _tanh_stage1(x, minus_2log2e_over_cap):
    return _clamp_low(minus_2log2e_over_cap * mx.abs(x.astype(mx.float32)))


@_kernel
def _softcap_finish(x, cap, scale, fq):
    # tanh|y| = (1 - e) / (1 + e) = -m / (2 + m) with m = e - 1, e = exp(-2|y|):
    # m = (scale - 1) + scale * fq keeps its precision as y -> 0.  One select, last.
    m = (scale - 1) + scale * fq
    t = cap * (-m / (2 + m))
    return mx.where(x < 0, -t, t)


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap), in float32."""
    return _softcap_finish(x, cap, *_exp2(_tanh_stage1(x, -2 * LOG2E / cap)))


def logsumexp(x: mx.array) -> mx.array:
    """log(sum(exp(x))) over the last axis (kept), in float32; a row of -inf gives -inf."""
    x = x.astype(mx.float32)
    m = x.max(axis=-1, keepdims=True)
    m = mx.where(m == -mx.inf, 0.0, m)  # so that an all -inf row sums to 0, not NaN
    return m + mx.log(exp(x - m).sum(axis=-1, keepdims=True))


def exp_rows(x: mx.array) -> tuple[mx.array, mx.array]:
    """(exp(x - max), 1 / sum of that) over the last axis, in float32: softmax(x)
    is their product, which a caller may take after a product with the rows."""
    x = x.astype(mx.float32)
    e = exp(x - x.max(axis=-1, keepdims=True))
    return e, 1 / e.sum(axis=-1, keepdims=True)


def softmax(x: mx.array) -> mx.array:
    """softmax over the last axis, in float32 (a row of -inf gives NaN, as MLX's).
    The max is subtracted outside the compiled kernels: MLX's compiled kernels read a
    broadcast operand element by element, its own subtract runs the rows as vectors."""
    e, inv = exp_rows(x)
    return e * inv
