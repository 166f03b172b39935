"""The weight formats: one entry per format, the one place that says how each is stored
and which MLX kernel runs it (docs/quantization.md §1, §2.4, §3, §5).

Read by the converter's policy (`convert/policy.py`: recipes, group sizes, the
config.json entries it writes), the loader (`checkpoint/quantized.py`: config.json
entry -> kernel parameters, derived biases) and the quantized modules
(`models/moe.py`: a kernel mode's default group size and bits).

A format's `name` is what config.json records (`quantization.tensors.<path>.format`,
or an mlx-lm `mode`); `mode` is the MLX kernel that runs it (`mx.quantized_matmul`,
`gather_qmm`, `mx.dequantize`).  Two of ours borrow an MLX kernel:
- q4_0: ggml Q4_0 is exactly MLX affine g32 4-bit with biases = -8 * scales, so the
  biases are derived at load, not stored (4.5 bits per weight, as in ggml);
- sfp8: gemma.cpp's SFP8 codes transcoded to mxfp8, plus an fp32 per-tensor scale
  that the E8M0 group scales cannot absorb.
The MLX-native formats are named after their mode, so an mlx-lm `mode` is a format name.

encode / decode are the format's own codec and its reference decoder: the numpy ggml
and gemma.cpp codecs for q4_0 and sfp8 (their MLX forms: `q4_0.to_mlx_affine`,
`sfp8.to_mxfp8`), `mx.quantize` / `mx.dequantize` for MLX's own.  Floats have none (a cast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from gemma4_mlx.formats import q4_0, sfp8


@dataclass(frozen=True)
class WeightFormat:
    """How one weight format is stored and run.

    bits / group_size: fixed by the format, or (affine) the defaults used when a
    config.json entry leaves them out; `groups` lists the group sizes the converter
    may pick, preferred first (MLX 0.32: docs/quantization.md §5).
    biases: "stored" (affine), "derived" from the scales (q4_0: `bias_per_scale` *
    scales), or "none" (the fp formats and floats).
    """

    name: str
    mode: str | None  # MLX kernel mode; None: a float weight, no kernel
    bits: int | None
    group_size: int | None
    fixed: bool  # bits and group_size are the format's own; False: an entry may set them
    groups: tuple[int, ...]
    biases: str
    tensor_scale: bool  # an fp32 per-tensor scale multiplies the product (sfp8)
    encode: Callable | None
    decode: Callable | None
    bias_per_scale: int | None = None

    @property
    def quantized(self) -> bool:
        return self.mode is not None

    def kernel(self, bits: int | None = None, group_size: int | None = None) -> dict:
        """MLX kernel parameters {mode, bits, group_size}; an entry's own bits /
        group_size count only where the format does not fix them."""
        if not self.fixed:
            bits, group_size = bits or self.bits, group_size or self.group_size
        else:
            bits, group_size = self.bits, self.group_size
        return {"mode": self.mode, "bits": int(bits), "group_size": int(group_size)}


def _mlx(
    name: str, bits: int, group_size: int, groups: tuple[int, ...], fixed: bool = True, biases: str = "none"
) -> WeightFormat:
    """An MLX-native format: named after its kernel mode, coded by MLX itself."""
    return WeightFormat(name, name, bits, group_size, fixed, groups, biases, False, mx.quantize, mx.dequantize)


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("float", None, None, None, True, (), "none", False, None, None),
        # MLX's own defaults (group 64, 4 bits) when an entry leaves them out
        _mlx("affine", 4, 64, (64, 32, 128), fixed=False, biases="stored"),
        WeightFormat(
            "q4_0",
            "affine",
            q4_0.BITS,
            q4_0.GROUP_SIZE,
            True,
            (q4_0.GROUP_SIZE,),
            "derived",
            False,
            q4_0.quantize,
            q4_0.dequantize,
            bias_per_scale=q4_0.BIAS_PER_SCALE,
        ),
        WeightFormat("sfp8", "mxfp8", 8, sfp8.GROUP, True, (sfp8.GROUP,), "none", True, sfp8.encode, sfp8.decode),
        _mlx("mxfp4", 4, 32, (32,)),
        _mlx("mxfp8", 8, 32, (32,)),
        _mlx("nvfp4", 4, 16, (16,)),
    )
}

# The MLX kernel modes, each the name of the MLX-native format that runs on it.
MODES: tuple[str, ...] = tuple(f.name for f in FORMATS.values() if f.mode == f.name)


def get(name: str) -> WeightFormat:
    """The format called `name`; ValueError naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def for_mode(mode: str) -> WeightFormat:
    """The MLX-native format of kernel mode `mode` (its default bits and group size)."""
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
    return FORMATS[mode]
