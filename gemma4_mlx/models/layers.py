"""Small building blocks shared by the Gemma 4 modules."""

import math

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx import ops


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """Bias-free linear through `ops.linear` (decode-friendly on the CPU).
    Quantization swaps it for nn.QuantizedLinear like any nn.Linear."""

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__(input_dims, output_dims, bias=False)

    def __call__(self, x):
        return ops.linear(x, self.weight)


CLAMPS = ("input_min", "input_max", "output_min", "output_max")


class ClippableLinear(nn.Module):
    """clamp(x, in_min, in_max) -> x W^T -> clamp(., out_min, out_max), the vision and
    audio towers' linears; the four scalars are checkpoint buffers (±inf when absent).
    Without clipping: a plain linear."""

    def __init__(self, d_in: int, d_out: int, clip: bool):
        super().__init__()
        self.linear = Linear(d_in, d_out)
        self.clip = clip
        if clip:
            for name in CLAMPS:
                setattr(self, name, mx.array(-math.inf if name.endswith("min") else math.inf))

    def __call__(self, x):
        if self.clip:
            x = mx.minimum(mx.maximum(x, self.input_min.astype(x.dtype)), self.input_max.astype(x.dtype))
        y = self.linear(x)
        if self.clip:
            y = mx.minimum(mx.maximum(y, self.output_min.astype(y.dtype)), self.output_max.astype(y.dtype))
        return y


class MultimodalEmbedder(nn.Module):
    """`embed_vision` / `embed_audio`: a weightless RMSNorm, then a projection into the
    text model's width."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = Linear(d_in, d_out)

    def __call__(self, x):
        return self.embedding_projection(ops.rms_norm(x, None, self.eps))
