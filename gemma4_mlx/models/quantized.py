"""Quantized stand-ins for `Linear` and `nn.Embedding` (docs/quantization.md §1, §2.4, §7).

Both subclass MLX's own quantized modules and add two things:
- an optional fp32 per-tensor `tensor_scale`, multiplied in after the product:
  SFP8 weights are stored as mxfp8 codes of w / s, and s is an arbitrary float
  that the E8M0 group scales cannot absorb (docs/quantization.md §2.4 b);
- outputs in the model's activation dtype: bf16 activations times fp16 Q4_0
  scales would otherwise promote the whole residual stream to float32, and
  mxfp4/nvfp4 embeddings would dequantize to bf16 inside a float32 model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx import ops_quantized
from gemma4_mlx.formats import q4_0

# Which format a module holds, its kernel and whether its biases are derived, come
# from `gemma4_mlx.formats.registry` (read by the loader when it builds these modules).

# Factors applied to a whole tensor's product, not per row (SFP8's scale, shape (1,)):
# a rank's shard keeps them whole, stacked modules widen them to one per output row.
PER_TENSOR = ("tensor_scale",)


def affine_biases(module: nn.Module, scales: mx.array | None = None) -> mx.array | None:
    """The module's affine biases: stored, or for Q4_0 derived from the scales when
    the product runs (-8 * d, exact in the scales' dtype), so that Q4_0 keeps
    4.5 bits per weight resident like ggml instead of MLX's usual 5.0 (docs/quantization.md §1)."""
    if getattr(module, "derive_biases", False):
        s = module["scales"] if scales is None else scales
        return s * mx.array(q4_0.BIAS_PER_SCALE, s.dtype)
    return module.get("biases")


def entry(a: mx.array, i: int) -> mx.array:
    """a[i] as a view.  MLX's integer index is a gather that copies: one of 26B-A4B's
    experts (16 MB) took 1.05 ms to copy, a product of one row with it 0.29 ms."""
    i %= a.shape[0]  # a[-1] too
    return a[i : i + 1].squeeze(0)


def row_biases(module: nn.Module, rows, scales: mx.array) -> mx.array | None:
    """Affine biases of the gathered `rows` (table rows as an array of ids, or one
    expert as an int) whose scales are `scales`: derived from them, or the stored
    biases indexed the same way."""
    b = None if getattr(module, "derive_biases", False) else module.get("biases")
    if b is None:
        return affine_biases(module, scales)
    return entry(b, rows) if isinstance(rows, int) else b[rows]


def scaled(y: mx.array, module: nn.Module, dtype: mx.Dtype) -> mx.array:
    """A quantized product finished: times `tensor_scale` (SFP8) if the module has one,
    in `dtype` (the activations': fp16 scales would otherwise promote bf16)."""
    if "tensor_scale" in module:
        y = y * module["tensor_scale"].astype(mx.float32)
    return y.astype(dtype)


def quantized_linear(module: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a quantized [out, in] weight: `QLinear` and the tied head `QEmbedding.as_linear`."""
    w, scales, biases = module["weight"], module["scales"], affine_biases(module)
    y = ops_quantized.quantized_linear(x, w, scales, biases, module.group_size, module.bits, module.mode)
    return scaled(y, module, x.dtype)


def _finish_init(module: nn.Module, tensor_scale: bool, derive_biases: bool) -> None:
    """What QLinear and QEmbedding add to MLX's modules: no resident biases when they
    are derived (or the mode has none), and the optional SFP8 scale."""
    module.derive_biases = derive_biases
    if module.get("biases") is None or derive_biases:
        module.pop("biases", None)
    if tensor_scale:
        module.tensor_scale = mx.ones((1,), mx.float32)


class QLinear(nn.QuantizedLinear):
    """Bias-free quantized linear; `tensor_scale` (SFP8) applied after the matmul."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        group_size: int,
        bits: int,
        mode: str = "affine",
        tensor_scale: bool = False,
        derive_biases: bool = False,
    ):
        super().__init__(input_dims, output_dims, bias=False, group_size=group_size, bits=bits, mode=mode)
        _finish_init(self, tensor_scale, derive_biases)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return quantized_linear(self, x)


class QEmbedding(nn.QuantizedEmbedding):
    """Quantized table; `as_linear` serves the tied LM head (docs/quantization.md §7).

    out_dtype: dtype of looked-up rows (the model's activation dtype), set by the loader.
    """

    def __init__(
        self,
        num_embeddings: int,
        dims: int,
        group_size: int,
        bits: int,
        mode: str = "affine",
        tensor_scale: bool = False,
        derive_biases: bool = False,
    ):
        super().__init__(num_embeddings, dims, group_size=group_size, bits=bits, mode=mode)
        _finish_init(self, tensor_scale, derive_biases)
        self.out_dtype = None
        self.freeze()

    @property
    def dtype(self) -> mx.Dtype:
        if self.out_dtype is not None:
            return self.out_dtype
        s = self["scales"].dtype
        return s if mx.issubdtype(s, mx.floating) else mx.bfloat16

    def __call__(self, ids: mx.array) -> mx.array:
        # in float32: fp16 scales would round each looked-up weight to fp16 (and a Q4_0
        # bias -8 d derived in fp16 overflows for |d| > 8188)
        scales, _ = ops_quantized.float32_affine(self["scales"][ids], None, self.mode)
        _, biases = ops_quantized.float32_affine(scales, row_biases(self, ids, scales), self.mode)
        rows = mx.dequantize(
            self["weight"][ids],
            scales=scales,
            biases=biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            dtype=mx.float32,
        )
        return scaled(rows, self, self.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_linear(self, x)


def table_dtype(emb: nn.Module) -> mx.Dtype:
    """Dtype of the rows an embedding returns: quantized tables and memory-mapped
    ones (`MappedTable`) say so through `.dtype`; a plain table is its weight's."""
    return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype
