"""Quantized stand-ins for `Linear` and `nn.Embedding` (spec quantization.md §1, §2.4, §7).

Both subclass MLX's own quantized modules and add two things:
- an optional fp32 per-tensor `tensor_scale`, multiplied in after the product:
  SFP8 weights are stored as mxfp8 codes of w / s, and s is an arbitrary float
  that the E8M0 group scales cannot absorb (§2.4 b);
- outputs in the model's activation dtype: bf16 activations times fp16 Q4_0
  scales would otherwise promote the whole residual stream to float32, and
  mxfp4/nvfp4 embeddings would dequantize to bf16 inside a float32 model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Formats as recorded in config.json -> the MLX kernel parameters that run them.
# q4_0 is MLX affine g32 with biases = -8 * scales; sfp8 is mxfp8 plus tensor_scale.
KERNEL_PARAMS = {
    "affine": None,  # bits / group_size come from the entry itself
    "q4_0": {"mode": "affine", "bits": 4, "group_size": 32},
    "sfp8": {"mode": "mxfp8", "bits": 8, "group_size": 32},
    "mxfp4": {"mode": "mxfp4", "bits": 4, "group_size": 32},
    "mxfp8": {"mode": "mxfp8", "bits": 8, "group_size": 32},
    "nvfp4": {"mode": "nvfp4", "bits": 4, "group_size": 16},
}


def affine_biases(module: nn.Module, scales: mx.array | None = None) -> mx.array | None:
    """The module's affine biases: stored, or for Q4_0 derived from the scales when
    the product runs (-8 * d, exact in the scales' dtype), so that Q4_0 keeps
    4.5 bits per weight resident like ggml instead of MLX's usual 5.0 (§1)."""
    if getattr(module, "derive_biases", False):
        s = module["scales"] if scales is None else scales
        return s * mx.array(-8, s.dtype)
    b = module.get("biases")
    return b


def _scaled(y: mx.array, module: nn.Module) -> mx.array:
    if "tensor_scale" in module:
        y = y * module["tensor_scale"].astype(mx.float32)
    return y


class QLinear(nn.QuantizedLinear):
    """Bias-free quantized linear; `tensor_scale` (SFP8) applied after the matmul."""

    def __init__(self, input_dims: int, output_dims: int, group_size: int, bits: int,
                 mode: str = "affine", tensor_scale: bool = False, derive_biases: bool = False):
        super().__init__(input_dims, output_dims, bias=False, group_size=group_size,
                         bits=bits, mode=mode)
        self.derive_biases = derive_biases
        if self.biases is None or derive_biases:
            self.pop("biases", None)
        if tensor_scale:
            self.tensor_scale = mx.ones((1,), mx.float32)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=affine_biases(self),
                                transpose=True, group_size=self.group_size, bits=self.bits,
                                mode=self.mode)
        return _scaled(y, self).astype(x.dtype)


class QEmbedding(nn.QuantizedEmbedding):
    """Quantized table; `as_linear` serves the tied LM head (§7).

    out_dtype: dtype of looked-up rows (the model's activation dtype), set by the loader.
    """

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int,
                 mode: str = "affine", tensor_scale: bool = False, derive_biases: bool = False):
        super().__init__(num_embeddings, dims, group_size=group_size, bits=bits, mode=mode)
        self.derive_biases = derive_biases
        if self.biases is None or derive_biases:
            self.pop("biases", None)
        if tensor_scale:
            self.tensor_scale = mx.ones((1,), mx.float32)
        self.out_dtype = None
        self.freeze()

    @property
    def dtype(self) -> mx.Dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        s = self["scales"].dtype
        return s if mx.issubdtype(s, mx.floating) else mx.bfloat16

    def __call__(self, ids: mx.array) -> mx.array:
        scales = self["scales"][ids]
        b = None if self.derive_biases else self.get("biases")
        rows = mx.dequantize(self["weight"][ids], scales=scales,
                             biases=affine_biases(self, scales) if b is None else b[ids],
                             group_size=self.group_size, bits=self.bits, mode=self.mode,
                             dtype=mx.float32)
        return _scaled(rows, self).astype(self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self["weight"], scales=self["scales"], biases=affine_biases(self),
                                transpose=True, group_size=self.group_size, bits=self.bits,
                                mode=self.mode)
        return _scaled(y, self).astype(x.dtype)


def table_dtype(emb: nn.Module) -> mx.Dtype:
    """Dtype of the rows an embedding returns: quantized tables and memory-mapped
    ones (`MappedTable`) say so through `.dtype`; a plain table is its weight's."""
    return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype
