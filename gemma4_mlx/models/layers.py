"""Small building blocks shared by the Gemma 4 modules."""

import mlx.core as mx
import mlx.nn as nn

from .. import ops


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
