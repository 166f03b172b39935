"""ggml Q4_0, its byte layout, its exact mapping onto MLX affine, and QAT lattice recovery.

Q4_0 (docs/quantization.md §3): blocks of 32 consecutive values along the last axis,
one fp16 scale d and 32 codes q in 0..15; value = d * (q - 8).
Arrays here: d [..., K/32] float16, q [..., K/32, 32] uint8 in logical element order.
Raw ggml block (18 bytes): little-endian fp16 d, then qs[16] with element j in the low
nibble of qs[j] and element j + 16 in the high nibble.
MLX affine form: group_size 32, bits 4, scales = d, biases = -8*d, 8 codes per uint32 with
element 0 in the least significant nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # values per block
BLOCK_BYTES = 2 + QK // 2  # fp16 d + 16 bytes of nibbles = 18 (4.5 bits/weight)
GROUP_SIZE, BITS = 32, 4  # MLX affine parameters of the mapping
BIAS_PER_SCALE = -8  # MLX affine biases = -8 * scales: d * (q - 8) = d * q + (-8 * d)


def _blocks(w, what: str) -> np.ndarray:
    """float32 [..., K/32, 32] view of w (numpy or MLX), with shape and finiteness checks."""
    if type(w).__module__.startswith("mlx"):
        import mlx.core as mx

        w = np.array(w.astype(mx.float32))
    x = np.asarray(w, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK:
        raise ValueError(f"{what}: last axis must be a multiple of {QK}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: input contains NaN or Inf")
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _signed_extremum(b: np.ndarray) -> np.ndarray:
    """Per block, the element of largest magnitude with its sign; first one on ties (ggml's
    `if (amax < fabsf(v))` scan keeps the first)."""
    idx = np.argmax(np.abs(b), axis=-1)  # argmax returns the first maximum
    return np.take_along_axis(b, idx[..., None], axis=-1)[..., 0]


def quantize(w) -> tuple[np.ndarray, np.ndarray]:
    """ggml `quantize_row_q4_0_ref`: d = max / -8 and q = min(15, trunc(x/d + 8.5)), in fp32.

    q uses the fp32 d; only the stored d is rounded to fp16 (as ggml does).
    """
    b = _blocks(w, "q4_0.quantize")
    mx_ = _signed_extremum(b)
    d = (mx_ / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    t = (b * inv[..., None]).astype(np.float32) + np.float32(8.5)  # fp32 add, as in C
    q = np.minimum(15, np.trunc(t).astype(np.int32))  # (int8_t) cast truncates toward zero
    return d.astype(np.float16), q.astype(np.uint8)


def dequantize(d, q) -> np.ndarray:
    """Reference decoder (ggml `dequantize_row_q4_0`): float32 (q - 8) * d, shape [..., K]."""
    d32 = np.asarray(d).astype(np.float32)
    qi = np.asarray(q).astype(np.int32) - 8
    v = qi.astype(np.float32) * d32[..., None]
    return v.reshape(*v.shape[:-2], -1)


def pack(d, q) -> np.ndarray:
    """Raw ggml blocks: uint8 [..., K/32, 18] (fp16 d little-endian, then the 16 nibble bytes)."""
    d16 = np.ascontiguousarray(np.asarray(d, dtype=np.float16)).astype("<f2")
    q = np.asarray(q, dtype=np.uint8)
    if q.shape != d16.shape + (QK,) or (q > 15).any():
        raise ValueError(f"q4_0.pack: need q of shape {d16.shape + (QK,)} with values 0..15, got {q.shape}")
    out = np.empty(d16.shape + (BLOCK_BYTES,), np.uint8)
    out[..., :2] = d16[..., None].view(np.uint8)
    out[..., 2:] = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)  # element j low, j + 16 high
    return out


def unpack(blocks) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack`: raw bytes [..., K/32, 18] (or a flat byte string of whole blocks)."""
    raw = np.frombuffer(blocks, np.uint8) if isinstance(blocks, (bytes, bytearray, memoryview)) else blocks
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim == 1:
        if raw.size % BLOCK_BYTES:
            raise ValueError(f"q4_0.unpack: {raw.size} bytes is not a whole number of {BLOCK_BYTES}-byte blocks")
        raw = raw.reshape(-1, BLOCK_BYTES)
    if raw.shape[-1] != BLOCK_BYTES:
        raise ValueError(f"q4_0.unpack: last axis must be {BLOCK_BYTES} bytes, got {raw.shape}")
    d = np.ascontiguousarray(raw[..., :2]).view("<f2")[..., 0].astype(np.float16)
    qs = raw[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return d, q


def to_mlx_affine(d, q, scale_dtype="float32"):
    """MLX affine arrays (w_q uint32 [..., K/8], scales, biases [..., K/32]) for
    `mx.dequantize` / `mx.quantized_matmul` with group_size=32, bits=4.

    scales = d, biases = -8*d: exact in fp16 and fp32 (-8d is d times a power of two).
    scale_dtype "float32" (default) makes d*q - 8d exact in fp32 arithmetic, so MLX
    reproduces the ggml decoder bit for bit; "float16" stores half the metadata but MLX
    then computes in fp16 (d*q can need 15 significant bits); "auto" = float16 if d fits
    exactly, else float32.  bf16 is refused: it rounds fp16 d (10 -> 7 mantissa bits).
    float16 becomes float32 (the same values) when a bias -8d would overflow fp16
    (|d| > 8188: valid fp16 d that ggml decodes in fp32; the bias would be -inf).
    """
    import mlx.core as mx

    d32 = np.asarray(d).astype(np.float32)
    q = np.asarray(q, dtype=np.uint8)
    if q.shape != d32.shape + (QK,):
        raise ValueError(f"q4_0.to_mlx_affine: need q of shape {d32.shape + (QK,)}, got {q.shape}")
    name = str(scale_dtype).replace("mlx.core.", "")
    if name == "auto":
        name = "float16" if _fits_fp16(d32).all() else "float32"
    if name == "float16" and not bias_fits_fp16(d32):
        name = "float32"
    if name == "bfloat16":
        raise ValueError("q4_0.to_mlx_affine: bfloat16 scales are lossy for Q4_0 (fp16 d); use float16 or float32")
    if name not in ("float16", "float32"):
        raise ValueError(f"q4_0.to_mlx_affine: scale_dtype must be float16, float32 or auto, got {scale_dtype!r}")
    dt = mx.float16 if name == "float16" else mx.float32
    flat = q.reshape(*q.shape[:-2], -1, 8).astype(np.uint32)  # 8 codes per word, logical order
    words = np.zeros(flat.shape[:-1], np.uint32)
    for i in range(8):
        words |= flat[..., i] << np.uint32(4 * i)  # element 0 in the lowest nibble
    scales = mx.array(d32).astype(dt)
    return mx.array(words), scales, (scales * BIAS_PER_SCALE).astype(dt)


def bias_fits_fp16(d) -> bool:
    """Whether every derived bias -8 d is finite in fp16."""
    return bool(np.all(np.abs(np.asarray(d, np.float32)) * -BIAS_PER_SCALE <= np.finfo(np.float16).max))


def _fits_fp16(d32: np.ndarray) -> np.ndarray:
    return d32.astype(np.float16).astype(np.float32) == d32


def _round_to(x: np.ndarray, storage: str) -> np.ndarray:
    """Round fp32 values to the storage dtype of the checkpoint (and back to fp32)."""
    if storage == "float32":
        return x
    if storage == "float16":
        return x.astype(np.float16).astype(np.float32)
    if storage == "bfloat16":  # round to nearest even on the upper 16 bits
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        return u.view(np.float32)
    raise ValueError(f"q4_0: storage must be float32, float16 or bfloat16, got {storage!r}")


@dataclass
class Lattice:
    """Result of `recover_lattice`: the Q4_0 codes found per block and how well they fit."""

    d: np.ndarray  # float32 [..., K/32]: signed extremum / -8
    q: np.ndarray  # uint8 [..., K/32, 32]
    exact: np.ndarray  # bool [..., K/32]: storage-rounded d*(q-8) equals the input bit for bit
    near: np.ndarray  # bool [..., K/32]: max |w - d*(q-8)| <= |d|/16 (docs/quantization.md §4.3 step 3)
    fraction: float  # fraction of exact blocks
    d_fits_fp16: bool  # every d exactly representable in fp16

    def to_mlx_affine(self, scale_dtype="auto"):
        return to_mlx_affine(self.d, self.q, scale_dtype)


def recover_lattice(w, storage: str | None = None) -> Lattice:
    """Recover the Q4_0 lattice from a QAT "unquantized" tensor (docs/quantization.md §4.3).

    Per block: d = signed extremum / -8, q = clip(round(w/d) + 8, 0, 15).  A block is
    exact when d*(q-8), rounded to the checkpoint's storage dtype, reproduces w exactly
    (a bf16 checkpoint stores bf16(7d), not 7d).  storage defaults to the input's dtype
    (bfloat16 for an MLX bf16 array, else float32/float16).
    """
    if storage is None:
        dt = str(getattr(w, "dtype", "float32")).replace("mlx.core.", "")
        storage = dt if dt in ("bfloat16", "float16") else "float32"
    b = _blocks(w, "q4_0.recover_lattice")
    d = (_signed_extremum(b) / np.float32(-8)).astype(np.float32)  # exact barring underflow
    safe = np.where(d != 0, d, np.float32(1))[..., None]
    q = np.where(d[..., None] != 0, np.clip(np.rint(b / safe) + 8, 0, 15), 8).astype(np.uint8)
    rec = (q.astype(np.float32) - 8) * d[..., None]  # exact in fp32: <= 11 + 4 bits
    exact = (_round_to(rec, storage) == b).all(-1)
    near = (np.abs(b - rec) <= np.abs(d)[..., None] / 16).all(-1)
    frac = float(exact.mean()) if exact.size else 1.0
    return Lattice(d, q, exact, near, frac, bool(_fits_fp16(d).all()))
