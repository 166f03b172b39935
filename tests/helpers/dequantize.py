"""Float32 twins of loaded quantized models: every quantized module's weights
dequantized (SFP8's per-tensor scale applied), the rest widened — what the
quantized runtime must compute, for the tests to compare it with."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx.models.moe import QuantizedExpertLinear
from gemma4_mlx.models.quantized import QEmbedding, QLinear, affine_biases

QUANTIZED = (QLinear, QEmbedding, QuantizedExpertLinear)
_PACKING = ("weight", "scales", "biases", "tensor_scale")  # what dequantizing replaces
STACKED = (("self_attn", "qkv_proj"), ("mlp", "gate_up_proj"), ("experts", "gate_up_proj"))


def float_weights(model: nn.Module, keep=lambda key: False) -> dict[str, mx.array]:
    """path -> float32 weight for every parameter of `model`; `keep(key)`: left as is."""
    params = {}
    for path, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            w = mx.dequantize(
                m["weight"], m["scales"], affine_biases(m), m.group_size, m.bits, mode=m.mode, dtype=mx.float32
            )
            if "tensor_scale" in m:  # one per tensor, or per output row once stacked (models/fuse.py)
                s = m["tensor_scale"]
                w = w * (s[:, None] if s.size > 1 else s)
            params[path + ".weight"] = w
    quantized = {k.rpartition(".")[0] for k in params}
    for k, v in tree_flatten(model.parameters()):
        path, _, leaf = k.rpartition(".")
        if path not in quantized or leaf not in _PACKING:  # a quantized linear's `.bias` stays
            params[k] = v if keep(k) else v.astype(mx.float32)
    return params


def stack_like(fresh_layers, loaded_layers) -> None:
    """Stack a freshly built model's projections where the loader stacked the loaded
    one's (`models/fuse.py`), so that their parameter paths match."""
    for mine, theirs in zip(fresh_layers, loaded_layers):
        for name, stacked in STACKED:
            if name in theirs and stacked in theirs[name]:
                mine[name].fuse()


def float_twin(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """`fresh` (a new model of `model`'s architecture) holding `model`'s weights as
    float32 (`float_weights`), stacked like it: what its quantized runtime must compute."""
    stack_like(fresh.layers, model.layers)
    fresh.load_weights(list(float_weights(model).items()))
    return fresh.eval()
