"""SFP8: gemma.cpp's 8-bit "switched floating point", with a per-tensor scale.

Byte layout `s ccccccc` (docs/quantization.md §2.1):
  c = 0          zero
  c = 1 .. 63    small: e = c >> 2, m = c & 3  -> (1 + m/4) * 2^(e - 23)   (2^-23 .. 1.75*2^-8)
  c = 64 .. 127  large: e = c >> 3, m = c & 7  -> (1 + m/8) * 2^(e - 15)   (2^-7  .. 1.875)
Code 0x80 (-0) is reserved: never emitted, read as 0.

Two encoders (`rounding=`):
  "nearest"  the docs/quantization.md §2.2 rule: round the fp32 magnitude to 3 (>= 1.9375*2^-8) or
             2 mantissa bits, ties to even, carrying into the exponent; a result of
             exactly 2^-23 becomes code 1; below that, 0.  This is also what
             gemma.cpp's scalar test encoder (`SFP8FromF32`, sfp_test.cc) computes.
  "gemma"    bit-faithful to gemma.cpp's production SIMD encoder (`SfpCodec::Enc`):
             fp32 is *truncated* to bf16 and `EncBytes` drops the lowest bf16
             mantissa bit before rounding, so only the top 6 mantissa bits are seen.
             A value just above a tie then rounds like a tie (to even), i.e. down
             about half the time.  Same codes as "nearest" for every input with at
             most 6 mantissa bits (all bf16 values whose 7th bit is 0).

Inference form: SFP values are transcoded to MLX's native `mxfp8` (E4M3 elements, one
E8M0 scale per 32) plus the fp32 tensor scale applied after the matmul (docs/quantization.md §2.4 b).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX = 1.875  # largest magnitude, code 0x7F (gemma.cpp SfpStream::kMax)
LARGE_MIN = 1.9375 * 2.0**-8  # 1.1111b * 2^-8: from here on, round with 3 mantissa bits
GROUP = 32  # mxfp8 group size (the only one MLX supports)
ROUNDINGS = ("nearest", "gemma")
CHUNK = 1 << 22  # elements encoded per step


def _build_table() -> np.ndarray:
    """The reference decoder: value of every code, from the bit layout alone."""
    lut = np.zeros(256, np.float64)
    for c in range(1, 128):
        if c < 64:
            e, m = c >> 2, c & 3
            v = (1 + m / 4) * 2.0 ** (e - 23)
        else:
            e, m = c >> 3, c & 7
            v = (1 + m / 8) * 2.0 ** (e - 15)
        lut[c], lut[c | 0x80] = v, -v
    lut[0x80] = 0.0  # reserved -0: decoders must not produce it; read as 0
    return lut.astype(np.float32)  # every value is exact in fp32 (and bf16)


LUT = _build_table()
LUT.setflags(write=False)


def _as_f32(w) -> np.ndarray:
    """numpy float32 view of numpy / MLX (incl. bf16) / scalar input."""
    if type(w).__module__.startswith("mlx"):
        import mlx.core as mx

        w = np.array(w.astype(mx.float32))
    return np.asarray(w, dtype=np.float32)


def _check_finite(x: np.ndarray, what: str) -> None:
    # Any NaN/Inf would silently become a valid code (gemma.cpp asserts instead).
    bad = ~np.isfinite(x)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(x[idx]) else "Inf"
        raise ValueError(
            f"{what}: input contains {int(bad.sum())} non-finite value(s) ({kind} first at index {idx}); "
            "SFP8 has no NaN/Inf codes"
        )


def tensor_scale(w) -> float:
    """Per-tensor scale s (docs/quantization.md §2.2 step 1, gemma.cpp `ScaleWeights`): 1 if max|w| <= 1.875,
    else max|w| / 1.875 in fp32."""
    x = _as_f32(w)
    _check_finite(x, "sfp8.tensor_scale")
    return _scale_of(x)


def _scale_of(x: np.ndarray) -> float:
    amax = np.float32(np.abs(x).max()) if x.size else np.float32(0)
    return 1.0 if amax <= MAX else float(amax / np.float32(MAX))


def _encode_unit(x: np.ndarray, rounding: str) -> np.ndarray:
    """Codes of fp32 values with |x| <= 1.875 (already scaled)."""
    sign = np.signbit(x)
    bits = np.abs(x).view(np.uint32).astype(np.int64)
    if rounding == "gemma":
        bits &= ~np.int64((1 << 17) - 1)  # keep the exponent and the top 6 of 23 mantissa bits
    # The branch is chosen before rounding: >= 1.1111b*2^-8 rounds to >= 2^-7 either way.
    mag = bits.astype(np.uint32).view(np.float32)
    large = mag >= np.float32(LARGE_MIN)
    shift = np.where(large, 20, 21)  # 23 - mantissa bits kept (3 or 2)
    lsb = (bits >> shift) & 1
    # Round to nearest, ties to even; a mantissa overflow carries into the exponent.
    rounded = (bits + (np.int64(1) << (shift - 1)) - 1 + lsb) >> shift << shift
    e = (rounded >> 23) - 127
    m = (rounded >> shift) & np.where(large, 7, 3)
    # Small values that rounded up to 2^-7 have m == 0, and (e + 23) << 2 == 64 is also
    # the large-branch code of 2^-7, so one formula per branch is enough.
    code = np.where(e >= -7, ((e + 15) << 3) | m, ((e + 23) << 2) | m)
    code = np.where((e == -23) & (m == 0), 1, code)  # 1.0*2^-23 would read as zero: use 1.25*2^-23
    code = np.where(e < -23, 0, code)
    if np.any(code > 127):
        raise ValueError("sfp8: magnitude above 1.875 reached the unit encoder (scale first)")
    # the sign only on non-zero codes: -0 and negatives that flush to zero are +0, never 0x80
    return (code | ((sign & (code != 0)).astype(np.int64) << 7)).astype(np.uint8)


def encode(w, rounding: str = "nearest") -> tuple[np.ndarray, float]:
    """Encode a tensor: (uint8 codes of w's shape, per-tensor scale s); w ~= decode(codes) * s."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"sfp8.encode: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    x = _as_f32(w)
    _check_finite(x, "sfp8.encode")
    s = _scale_of(x)
    inv = np.float32(1.0 / np.float64(np.float32(s)))
    flat, out = x.reshape(-1), np.empty(x.size, np.uint8)
    for i in range(0, flat.size, CHUNK):  # bounded int64 temporaries for big tensors
        part = flat[i : i + CHUNK]
        if s != 1.0:
            # gemma.cpp: multiply by the fp32-rounded inverse, then clamp because the
            # product may still exceed 1.875 by an ulp.
            part = np.copysign(np.minimum(np.float32(MAX), np.abs(part * inv)), part).astype(np.float32)
        out[i : i + CHUNK] = _encode_unit(part, rounding)
    return out.reshape(x.shape), s


def decode(codes, scale: float = 1.0) -> np.ndarray:
    """Reference decoder: 256-entry table lookup, times the tensor scale (fp32)."""
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        raise ValueError(f"sfp8.decode: codes must be uint8, got {c.dtype}")
    v = LUT[c]
    return v if scale == 1.0 else v * np.float32(scale)


# ----------------------------------------------------------------------------- MLX


def lut_matmul(x, codes, scale: float = 1.0):
    """Reference MLX path (docs/quantization.md §2.4 a): y = x @ (s * LUT[codes]).T, dense, in x's dtype."""
    import mlx.core as mx

    table = mx.array(LUT).astype(x.dtype)  # SFP values are exact in bf16/fp16/fp32
    w = mx.take(table, mx.array(np.asarray(codes, np.uint8)).astype(mx.uint32))
    return (x @ w.T) * mx.array(scale, mx.float32).astype(x.dtype)


@dataclass
class SfpMxfp8:
    """SFP8 weights in MLX's native mxfp8 form, plus the tensor scale applied after the matmul."""

    w_q: object  # mx.array uint32 [N, K/4]
    scales: object  # mx.array uint8 (E8M0) [N, K/32]
    scale: float  # per-tensor SFP scale s (fp32), not foldable into E8M0
    exact_groups: float  # fraction of 32-element groups that decode bit-exactly to the SFP values
    exact_elements: float

    def dequantize(self):
        import mlx.core as mx

        w = mx.dequantize(self.w_q, self.scales, group_size=GROUP, bits=8, mode="mxfp8", dtype=mx.float32)
        return w * mx.array(self.scale, mx.float32)

    def matmul(self, x):
        """y = s * (x @ W.T) with MLX's quantized kernel (CPU accumulates in x's dtype)."""
        import mlx.core as mx

        y = mx.quantized_matmul(x, self.w_q, self.scales, transpose=True, group_size=GROUP, bits=8, mode="mxfp8")
        return y * mx.array(self.scale, mx.float32).astype(y.dtype)


def to_mxfp8(codes, scale: float = 1.0) -> SfpMxfp8:
    """Transcode SFP8 codes [N, K] (K % 32 == 0) to mxfp8 and measure which groups survive.

    SFP values are (1.mmm) * 2^e with <= 3 mantissa bits, so an element is exact in E4M3
    whenever its exponent lies within the group's E4M3 range; only groups spanning more
    binades than that lose their tiniest elements.
    """
    import mlx.core as mx

    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[1] % GROUP:
        raise ValueError(f"sfp8.to_mxfp8: need codes of shape [N, K] with K % {GROUP} == 0, got {c.shape}")
    v = decode(c)  # unit-range SFP values, without s
    w_q, scales = mx.quantize(mx.array(v), group_size=GROUP, bits=8, mode="mxfp8")
    back = np.array(mx.dequantize(w_q, scales, group_size=GROUP, bits=8, mode="mxfp8", dtype=mx.float32))
    same = back == v
    groups = same.reshape(c.shape[0], -1, GROUP).all(-1)
    return SfpMxfp8(w_q, scales, float(scale), float(groups.mean()), float(same.mean()))


def path_error(w, x=None, rounding: str = "nearest", seed: int = 0) -> dict:
    """Error of the mxfp8 inference path against the LUT reference, for weight matrix w [N, K].

    Returns exact group/element fractions, the weights' relative L2 and max abs difference,
    the largest element error relative to its group's max |w|, and the relative L2
    difference of y = x @ W.T between the two paths (fp32 activations; x random if None).
    """
    import mlx.core as mx

    codes, s = encode(w, rounding)
    ref = decode(codes, s)
    mxw = to_mxfp8(codes, s)
    got = np.array(mxw.dequantize())
    diff = got - ref
    gmax = np.abs(ref).reshape(ref.shape[0], -1, GROUP).max(-1, keepdims=True)
    rel_to_group = np.abs(diff).reshape(gmax.shape[0], -1, GROUP) / np.where(gmax > 0, gmax, 1)
    if x is None:
        x = np.random.default_rng(seed).standard_normal((8, ref.shape[1])).astype(np.float32)
    xm = mx.array(np.asarray(x, np.float32))
    y_ref = np.array(lut_matmul(xm, codes, s))
    y_mx = np.array(mxw.matmul(xm))
    return {
        "exact_groups": mxw.exact_groups,
        "exact_elements": mxw.exact_elements,
        "weight_rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
        "weight_max_abs": float(np.abs(diff).max()),
        "max_err_over_group_max": float(rel_to_group.max()),
        "matmul_rel_l2": float(np.linalg.norm(y_mx - y_ref) / max(np.linalg.norm(y_ref), 1e-30)),
    }


def distortion(w, rounding: str = "nearest") -> float:
    """Relative L2 error of SFP8 encode+decode on w."""
    x = _as_f32(w)
    codes, s = encode(x, rounding)
    return float(np.linalg.norm(decode(codes, s) - x) / max(np.linalg.norm(x), 1e-30))
