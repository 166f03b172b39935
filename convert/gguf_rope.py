"""The full-attention layers' partial-rotary factor of a Gemma 4 GGUF.

llama.cpp stores no factor in the metadata.  Its converter writes the full layers
with `rope.dimension_count` = the whole head and one global F32 tensor
`rope_freqs.weight` of head_dim / 2 frequency divisors: 1.0 for the first n pairs
(rotated as usual) and 1e30 after them (angle ~0: not rotated).  That is exactly
HF's "proportional" RoPE with partial_rotary_factor = 2n / head_dim, so the factor
is read back from where the ones end.  Any other pattern has no MLX equivalent here
and is refused, naming the tensor.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConvertError

TENSOR = "rope_freqs.weight"
DEFAULT_FACTOR = 0.25  # Gemma 4's released value: used only when the GGUF has no rope_freqs
_OFF = np.float32(1e30)  # llama.cpp's divisor for an unrotated pair, as stored (float32)


def full_rotary_factor(g, head_dim: int) -> tuple[float, str]:
    """(partial_rotary_factor, where it came from) for the full-attention layers."""
    t = g.tensors.get(TENSOR)
    if t is None:
        return DEFAULT_FACTOR, f"Gemma 4 default (no {TENSOR} in the GGUF)"
    if t.type != "F32":
        raise ConvertError(f"{g.path}: tensor {TENSOR} is {t.type}; expected F32")
    if t.shape != (head_dim // 2,):
        raise ConvertError(
            f"{g.path}: tensor {TENSOR} has shape {t.shape}; expected ({head_dim // 2},) "
            f"(half the full-attention head dim {head_dim})"
        )
    v = np.asarray(g.raw(TENSOR), dtype=np.float32)
    n = int(np.argmin(v == 1.0)) if not (v == 1.0).all() else v.size  # leading ones
    if n == 0 or not (v[n:] == _OFF).all():
        raise ConvertError(
            f"{g.path}: tensor {TENSOR} is not 1.0 for the rotated pairs followed by 1e30 "
            f"(llama.cpp's proportional-RoPE pattern); got {_show(v)}"
        )
    return _factor(n, head_dim), TENSOR


def _factor(pairs: int, head_dim: int) -> float:
    """2 * pairs / head_dim, nudged up if needed so that the runtime's
    int(factor * head_dim // 2) gives back exactly `pairs`."""
    f = 2 * pairs / head_dim
    while int(f * head_dim // 2) < pairs:
        f = math.nextafter(f, math.inf)
    return f


def check_rotary_dims(g, key, head_dim: int, head_dim_swa: int) -> None:
    """llama.cpp rotates the whole head on both layer types (the full layers' partial
    rotation lives in rope_freqs); another rotary dimension count has no equivalent here."""
    for k, want in (("rope.dimension_count", head_dim), ("rope.dimension_count_swa", head_dim_swa)):
        got = key(k, None)
        if got is not None and got != want:
            raise ConvertError(
                f"{g.path}: metadata key gemma4.{k} is {got}; expected {want} "
                "(the whole head, as llama.cpp writes Gemma 4)"
            )


def _show(v: np.ndarray) -> str:
    head = ", ".join(f"{x:g}" for x in v[:8])
    return f"[{head}{', ...' if v.size > 8 else ''}] ({v.size} values)"
