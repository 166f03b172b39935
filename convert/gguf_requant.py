"""A ggml type with no exact MLX quantized form (Q6_K: Google's QAT GGUF stores the tied
token embedding so) -> the tensor class's policy format (docs/quantization.md §4.4).

Q6_K's 16-element sub-block scales have no MLX quantized form, so the blocks are
dequantized exactly (gguf-py: ggml's fp32 arithmetic), rounded to fp16 (what MLX's own
GGUF loader does) and then handled like an fp16 tensor of an HF checkpoint: the tensor
class's policy format (embedding: 8-bit affine g64; PLE table / projections, router:
fp16 kept; everything on the recipe with keep_high_precision=False).  Not lossless:
each entry records it (`provenance`, `deviation`, `rel_rms_error` against the exact
dequantization).
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
from gguf.constants import QK_K

from . import codecs
from .gguf_blocks import chunks, dequantize, rows_map
from .gguf_read import block_size

FP16_MAX = 65504.0
# block_q6_K {ql[QK_K/2]; qh[QK_K/4]; int8 scales[QK_K/16]; fp16 d}: where the scales and d sit
_SCALES = QK_K // 2 + QK_K // 4
_D = _SCALES + QK_K // 16


def _q6_k_bound(raw: np.ndarray) -> float:
    """An upper bound of |value| over Q6_K blocks: max |d * scale| * 32 (|q - 32| <= 32)."""
    bound = 0.0
    for c in chunks(raw, "Q6_K"):
        b = c.reshape(-1, c.shape[-1])
        sc = np.ascontiguousarray(b[:, _SCALES:_D]).view(np.int8).astype(np.float32)
        d = np.ascontiguousarray(b[:, _D : _D + 2]).view("<f2").astype(np.float32)
        bound = max(bound, float(np.abs(d * sc).max(initial=0.0)) * 32)
    return bound


def requantize(module: str, raw: np.ndarray, ttype: str, policy) -> tuple[dict[str, mx.array], dict]:
    """ggml's values (fp32, exact), rounded to fp16 (fp32 if a value could overflow
    fp16), then the tensor class's policy format exactly as for an fp16 HF tensor.
    Returns (arrays, entry); the entry records the deviation and, for row-wise
    formats, the relative RMS error against ggml's exact values."""
    fmt, note = policy.for_tensor(module, raw.shape[-2] * block_size(ttype)[0])
    work = "float16" if _q6_k_bound(raw) <= FP16_MAX else "float32"
    if fmt.quantized and fmt.kind != "affine":
        # Per-tensor decisions (Q4_0's lattice fraction) need the whole tensor at once.
        x = rows_map(raw, ttype, lambda r: dequantize(ttype, r).astype(work))
        arrays, info = codecs.encode(mx.array(x), fmt)
        err = None
    else:  # row-wise formats: one chunk of rows at a time (bounded temporaries)
        if not fmt.quantized:
            fmt = replace(fmt, dtype=work)
        arrays, info, err = _row_wise(raw, ttype, fmt, work)
    arrays = {f"{module}.{k}": a.reshape(*raw.shape[:-2], -1) for k, a in arrays.items()}
    entry = {**fmt.entry(), **info, "source_type": ttype, **_provenance(ttype, fmt, info, work)}
    if note:
        entry["note"] = note
    if err is not None:
        entry["rel_rms_error"] = float(f"{err:.3g}")
    return arrays, entry


def _row_wise(raw: np.ndarray, ttype: str, fmt, work: str):
    """(arrays, codec info, relative RMS error) encoding one chunk of rows at a time."""
    parts, info, err2, ref2 = [], {}, 0.0, 0.0
    for c in chunks(raw, ttype):
        x = dequantize(ttype, c).reshape(c.shape[0], -1)
        arrays, info = codecs.encode(mx.array(x.astype(work)), fmt)
        mx.eval(list(arrays.values()))
        y = np.array(_decoded(arrays, fmt)).astype(np.float64)
        err2 += float(((y - x) ** 2).sum())
        ref2 += float((x.astype(np.float64) ** 2).sum())
        parts.append(arrays)
    arrays = {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]}
    return arrays, info, (err2 / ref2) ** 0.5 if ref2 else 0.0


def _provenance(ttype: str, fmt, info: dict, work: str) -> dict:
    """The entry's record of what was done to a tensor of type `ttype`."""
    if not fmt.quantized:
        return {
            "provenance": f"gguf-{ttype.lower()} dequantized",
            "reason": f"gguf {ttype}: no exact MLX quantized form; dequantized to {work} "
            "(this class stays high precision)",
        }
    what = f"{fmt.mode} {fmt.bits}-bit g{fmt.group_size}" if fmt.kind == "affine" else fmt.kind
    entry = {"provenance": f"gguf-{ttype.lower()} dequantized, re-quantized to {what}"}
    if "provenance" in info:
        entry["requantization"] = info["provenance"]
    entry["deviation"] = (
        f"{ttype} (16-element sub-block scales) has no exact MLX quantized form: "
        f"dequantized exactly, rounded to {work}, re-quantized to {what} "
        "by this tensor class's policy"
    )
    if fmt.kind == "affine":
        entry["scale_dtype"] = work
    return entry


def _decoded(arrays: dict, fmt) -> mx.array:
    """float32 values of one encoded chunk (float or affine)."""
    if not fmt.quantized:
        return arrays["weight"].astype(mx.float32)
    return mx.dequantize(
        arrays["weight"],
        arrays["scales"].astype(mx.float32),
        arrays["biases"].astype(mx.float32),
        fmt.group_size,
        fmt.bits,
        mode=fmt.mode,
        dtype=mx.float32,
    )
