"""Quantized checkpoints: read the quantization block and swap modules for their
quantized forms before the weights are assigned."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.checkpoint.keys import module_path
from gemma4_mlx.formats.registry import FORMATS
from gemma4_mlx.models.layers import Linear
from gemma4_mlx.models.moe import ExpertLinear, QuantizedExpertLinear
from gemma4_mlx.models.quantized import QEmbedding, QLinear
from gemma4_mlx.models.text import Model

# -- quantized checkpoints --------------------------------------------------
# Two layouts are read (docs/quantization.md §1, docs/text-decoder.md §8.3 step 7):
# - ours (`gemma4-mlx convert`): config.json `quantization.tensors` names the format
#   of every matmul/embedding weight; Q4_0 stores no biases (they are -8 * scales and
#   derived here), SFP8 stores mxfp8 codes plus an fp32 `tensor_scale`;
# - mlx-lm / mlx-vlm (mlx-community): a module is quantized iff `<path>.scales`
#   exists; parameters from a per-path entry, else the block's group_size/bits/mode.

QUANT_META = (".scales", ".biases", ".tensor_scale")  # metadata tensors beside a quantized weight


def quantization_block(raw: dict, source: str) -> dict | None:
    q = raw.get("quantization")
    if q is None:
        text = raw.get("text_config")
        qc = raw.get("quantization_config") or (text.get("quantization_config") if isinstance(text, dict) else None)
        if not qc:
            return None
        if not isinstance(qc, dict) or not ("bits" in qc or "group_size" in qc):
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise LoadError(
                f"{source}: quantization_config (quant_method {method!r}) is not an MLX "
                "format; convert the unquantized checkpoint with `gemma4-mlx convert`"
            )
        q = qc
    if not isinstance(q, dict):
        raise LoadError(f"{source}: `quantization` must be an object, got {type(q).__name__}")
    return q


def kernel_params(path: str, q: dict, overrides: dict, source: str) -> dict | None:
    """MLX kernel parameters (format, mode, bits, group_size) for module `path`."""
    tensors = q.get("tensors") or {}
    if not isinstance(tensors, dict):
        raise LoadError(f"{source}: quantization.tensors must be an object, got {type(tensors).__name__}")
    entry = tensors.get(path)
    if entry is not None:  # ours: every entry names its format
        if not isinstance(entry, dict):
            raise LoadError(f"{source}: quantization.tensors[{path!r}] must be an object, got {entry!r:.40}")
        fmt = entry.get("format")
    else:
        entry = overrides.get(path)
        if entry is False:
            return None
        if isinstance(entry, dict):  # mlx-lm passes it to to_quantized(): affine unless it says
            fmt = entry.get("mode", "affine")
        else:
            entry, fmt = q, q.get("mode", "affine")
    spec = FORMATS.get(fmt)
    if spec is None or not spec.quantized:
        raise LoadError(f"{source}: {path}: unknown quantization format {fmt!r}")
    # affine: the entry's bits / group size, MLX's defaults where it leaves them out
    return dict(spec.kernel(entry.get("bits"), entry.get("group_size")), format=fmt)


def apply_quantization(model: Model, weights: dict[str, mx.array], q: dict, source: str) -> None:
    """Swap every module whose weights come quantized for its quantized variant.

    Runs before `check_and_assign`, so shapes are then checked against the
    quantized layout.
    """
    overrides = {
        module_path(k): v for k, v in q.items() if isinstance(v, (dict, bool)) and k not in ("tensors", "policy")
    }

    def swap(path: str, m):
        if f"{path}.scales" not in weights:
            return m
        p = kernel_params(path, q, overrides, source)
        if p is None:
            raise LoadError(f"{source}: {path}.scales present but config.json marks {path} unquantized")
        # Q4_0 stores no biases (-8 * scales): the module derives them per product,
        # so none are resident either (4.5 bits per weight, docs/quantization.md §1).
        derive = FORMATS[p["format"]].biases == "derived" and f"{path}.biases" not in weights
        kw = dict(
            group_size=p["group_size"],
            bits=p["bits"],
            mode=p["mode"],
            tensor_scale=f"{path}.tensor_scale" in weights,
            derive_biases=derive,
        )
        try:
            if isinstance(m, ExpertLinear):
                E, out_dims, in_dims = m.weight.shape
                return QuantizedExpertLinear(E, in_dims, out_dims, **kw)
            if isinstance(m, (Linear, nn.Linear)):
                out_dims, in_dims = m.weight.shape
                return QLinear(in_dims, out_dims, **kw)
            if isinstance(m, nn.Embedding):
                return QEmbedding(*m.weight.shape, **kw)
        except ValueError as e:
            raise LoadError(f"{source}: {path}: cannot build quantized module ({e})") from None
        raise LoadError(f"{source}: {path}.scales present but {type(m).__name__} cannot be quantized")

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
