"""HF -> MLX checkpoint conversion (installed as `gemma4_mlx.convert`).

    from gemma4_mlx.convert import convert
    convert("gemma-4-E2B-it", "gemma-4-E2B-it-q4_0", "q4_0")

Modules: `core` (streaming conversion, atomic output), `policy` (recipes and which
tensors stay high precision), `codecs` (per-format tensor encoding), `hub` (SRC
resolution), `drafter` (MTP drafter checkpoints), `gguf` (Q4_0 GGUF import).
"""

from .core import Report, convert
from .errors import ConvertError
from .policy import RECIPES, Policy

__all__ = ["convert", "ConvertError", "Report", "RECIPES", "Policy"]
