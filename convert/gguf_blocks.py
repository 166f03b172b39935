"""ggml blocks -> MLX affine, losslessly (docs/quantization.md §3.3-§3.4).

One transfer per ggml type (`TRANSFER`), each mapping the file's blocks exactly onto
MLX's affine g32 weight / scales (/ biases) without re-quantizing:
- Q4_0: codes + the file's fp16 d as MLX affine 4-bit (biases -8d derived at load);
- Q8_0, Q4_1, Q5_0, Q5_1: MLX affine 8/4/5/5-bit with stored fp16 scales = d and
  biases = -128d / m / -16d / m; codes re-packed.  Dequantized in fp32 these give
  ggml's values exactly, up to the sign of zero (d*code is exact in fp32, so the one
  rounding of d*code + bias is ggml's own; none for -128d / -16d).
The exact float32 decode of any block type (`dequantize`: norms stored in a block
type, Q6_K) is gguf-py's (`gguf.quants.dequantize`), not ours.

Blocks come as `GGUFFile.raw` gives them: uint8 [..., K / 32, bytes], little-endian,
fp16 d first:  Q4_0 {d; qs[16]}  Q4_1 {d; m; qs[16]}  Q5_0 {d; qh[4]; qs[16]}
Q5_1 {d; m; qh[4]; qs[16]}  Q8_0 {d; int8 qs[32]}.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from gemma4_mlx.formats import q4_0

from .gguf_read import block_size

ROWS_CHUNK = 1 << 20  # elements decoded per step (bounds the numpy temporaries)
# Types stored exactly as MLX affine g32 with stored biases: ggml type -> bits
EXACT_AFFINE = {"Q8_0": 8, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
_BIAS_RULE = {
    "Q8_0": "-128 * scales",
    "Q5_0": "-16 * scales",
    "Q4_1": "m (the block minimum)",
    "Q5_1": "m (the block minimum)",
}


# -- reading blocks ----------------------------------------------------------------------


def chunks(raw: np.ndarray, ttype: str):
    """Yield raw block rows [r, nblk, bytes] of about ROWS_CHUNK elements each."""
    nblk = raw.shape[-2]
    flat = raw.reshape(-1, nblk, raw.shape[-1])
    step = max(1, ROWS_CHUNK // (nblk * block_size(ttype)[0]))
    for a in range(0, flat.shape[0], step):
        yield np.asarray(flat[a : a + step])


def dequantize(ttype: str, raw: np.ndarray) -> np.ndarray:
    """ggml's float32 values of raw blocks [..., nblk, bytes] -> [..., nblk * block] (gguf-py)."""
    raw = np.asarray(raw, dtype=np.uint8)
    return gguf_dequantize(raw.reshape(*raw.shape[:-2], -1), GGMLQuantizationType[ttype])


def rows_map(raw: np.ndarray, ttype: str, fn) -> np.ndarray:
    """fn over row chunks of raw blocks, concatenated and shaped [..., K]."""
    out = np.concatenate([fn(c) for c in chunks(raw, ttype)])
    return out.reshape(*raw.shape[:-2], -1)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block, as float32 [..., nblk]."""
    return np.ascontiguousarray(raw[..., at : at + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs[16] -> 32 codes: element j in the low nibble of qs[j], element j + 16 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def affine_blocks(ttype: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [..., nblk, 32], scales, biases float32 [..., nblk]) with
    ggml value = scales * code + biases exactly (docs/quantization.md §3.4) for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0."""
    raw = np.asarray(raw, dtype=np.uint8)
    d = _f16(raw, 0)
    if ttype == "Q8_0":  # int8 q -> q + 128 (sign bit flipped); d*q = d*(q+128) - 128d
        return raw[..., 2:34] ^ np.uint8(0x80), d, d * np.float32(-128)
    if ttype == "Q4_0":
        return _nibbles(raw[..., 2:18]), d, d * np.float32(-8)
    if ttype == "Q4_1":
        return _nibbles(raw[..., 4:20]), d, _f16(raw, 2)
    if ttype in ("Q5_0", "Q5_1"):
        at = 2 if ttype == "Q5_0" else 4  # qh: uint32 little-endian, bit j = bit 4 of element j
        high = np.unpackbits(raw[..., at : at + 4], axis=-1, bitorder="little")
        codes = _nibbles(raw[..., at + 4 : at + 20]) | (high << 4)
        return codes, d, (d * np.float32(-16) if ttype == "Q5_0" else _f16(raw, 2))
    raise ValueError(f"{ttype} has no exact MLX affine form")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine packing: codes uint8 [..., K] -> uint32 [..., K * bits / 32], a
    little-endian bit stream (element 0 in the least significant bits of word 0)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.view("<u4")
    if bits == 4:
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).view("<u4")
    bitv = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bitv.reshape(*codes.shape[:-1], -1), axis=-1, bitorder="little").view("<u4")


# -- the transfers: (module, raw blocks) -> (arrays, report entry) -------------------------


def q4_0_transfer(module: str, raw: np.ndarray) -> tuple[dict[str, mx.array], dict]:
    """Q4_0 blocks [..., K/32, 18] -> MLX affine weight/scales, in row chunks so the
    unpacked uint8 codes never exist for the whole tensor at once."""
    lead = raw.shape[:-2]
    words, scales = [], []
    for c in chunks(raw, "Q4_0"):
        d, q = q4_0.unpack(c)
        w, s, _ = q4_0.to_mlx_affine(d, q, "float16")  # the file's fp16 d, exactly
        mx.eval(w, s)
        words.append(w)
        scales.append(s)
    arrays = {
        f"{module}.weight": mx.concatenate(words).reshape(*lead, -1),
        f"{module}.scales": mx.concatenate(scales).reshape(*lead, -1),  # float32 where -8d overflows fp16
    }
    entry = {
        "format": "q4_0",
        "mode": "affine",
        "bits": 4,
        "group_size": 32,
        "provenance": "gguf-q4_0",
        "scale_dtype": str(arrays[f"{module}.scales"].dtype).replace("mlx.core.", ""),
        "biases": "derived at load: -8 * scales",
    }
    return arrays, entry


def _fits_fp16(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # an overflow becomes Inf, which then differs
        return bool((x.astype(np.float16).astype(np.float32) == x).all())


def affine_transfer(module: str, raw: np.ndarray, ttype: str) -> tuple[dict[str, mx.array], dict]:
    """Q8_0/Q4_1/Q5_0/Q5_1 blocks -> MLX affine g32 weight/scales/biases (nothing
    re-quantized).  Scales are the file's fp16 d; biases (-128d, m, -16d) are fp16 too
    unless one overflows fp16 (|d| > 511 for Q8_0), then both are stored fp32."""
    bits, lead = EXACT_AFFINE[ttype], raw.shape[:-2]
    words, scales, biases = [], [], []
    for c in chunks(raw, ttype):
        codes, s, b = affine_blocks(ttype, c)
        words.append(mx.array(pack_codes(codes.reshape(codes.shape[0], -1), bits)))
        mx.eval(words[-1])
        scales.append(s)
        biases.append(b)
    s, b = np.concatenate(scales), np.concatenate(biases)
    dt = np.float16 if _fits_fp16(s) and _fits_fp16(b) else np.float32
    arrays = {
        f"{module}.weight": mx.concatenate(words).reshape(*lead, -1),
        f"{module}.scales": mx.array(s.astype(dt)).reshape(*lead, -1),
        f"{module}.biases": mx.array(b.astype(dt)).reshape(*lead, -1),
    }
    entry = {
        "format": "affine",
        "mode": "affine",
        "bits": bits,
        "group_size": 32,
        "provenance": f"gguf-{ttype.lower()}",
        "scale_dtype": np.dtype(dt).name,
        "biases": f"stored: {_BIAS_RULE[ttype]}",
        "exact": "dequantized in float32: ggml's values exactly (up to the sign of zero)",
    }
    return arrays, entry


# ggml type -> its lossless transfer
TRANSFER = {"Q4_0": q4_0_transfer, **{t: partial(affine_transfer, ttype=t) for t in EXACT_AFFINE}}
