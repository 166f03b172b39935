"""Projections that read the same input, stacked into one product at load time.

A decode step of a thin model is bound by the number of products as much as by
their bytes (docs/text-decoder.md §6.2): attention's q/k/v and the MLP's gate/up
read the same normed input, so after loading (and after a rank has cut its shard)
each group becomes one module whose output is the concatenation of theirs.  The
weights are concatenated along the output axis, which is exact for every format:
a float matrix, or quantized codes with their scales and biases (group rows are
independent), an SFP8 per-tensor scale widened to one scale per output row.

Groups whose members differ in kind, quantization or dtype (a mixed-precision
checkpoint keeping one of them wider) stay as they are.  On by default
(`ops.stack_projections`; docs/text-decoder.md §6.3 has the CPU measurements).
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx.models.quantized import PER_TENSOR


def _settings(m: nn.Module) -> dict:
    """A module's non-array attributes (group size, bits, mode, derived biases)."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_")}


def stack_outputs(parts: list[nn.Module], axis: int) -> nn.Module | None:
    """One module computing the concatenation of `parts`' outputs, or None when they
    cannot share one product.  axis: the weights' output axis (0 for [out, in]
    linears, 1 for [E, out, in] experts)."""
    first = parts[0]
    keys = set(first.keys())
    if any(type(m) is not type(first) or set(m.keys()) != keys or _settings(m) != _settings(first) for m in parts):
        return None
    if any(m[k].dtype != first[k].dtype for m in parts for k in keys if isinstance(first[k], mx.array)):
        return None  # concatenation would promote (bf16 beside float32 becomes float32)
    if any(isinstance(first[k], (dict, list, nn.Module)) for k in keys):
        return None  # a composite module (e.g. a clippable linear): not ours to stack
    fused = copy.copy(first)
    rows = [m["weight"].shape[axis] for m in parts]
    for k in keys:
        if k in PER_TENSOR:
            value = mx.concatenate([mx.broadcast_to(m[k].astype(mx.float32), (n,)) for m, n in zip(parts, rows)])
        else:
            value = mx.concatenate([m[k] for m in parts], axis=axis)
        setattr(fused, k, value)
    return fused


def fuse(module: nn.Module, names: tuple[str, ...], fused_name: str, axis: int = 0) -> bool:
    """Replace module.<names> by module.<fused_name>; False (nothing changed) when
    they cannot be stacked.  The caller splits the product by its known widths."""
    parts = [module[n] for n in names]
    fused = stack_outputs(parts, axis)
    if fused is None:
        return False
    mx.eval(fused.parameters())  # the parts' memory is released as they are dropped
    for n in names:
        module.pop(n)
    setattr(module, fused_name, fused)
    return True
