"""HF -> MLX checkpoint conversion (installed as `gemma4_mlx.convert`).

    from gemma4_mlx.convert import convert
    convert("gemma-4-E2B-it", "gemma-4-E2B-it-q4_0", "q4_0")

Modules: `core` (streaming conversion, atomic output), `output` (the report, shards,
progress), `policy` (recipes and which tensors stay high precision), `codecs`
(per-format tensor encoding), `hub` (SRC resolution), `drafter` (MTP drafter
checkpoints), `gguf` (GGUF import: `gguf_read` the file through gguf-py, `gguf_names`
names and config, `gguf_blocks` lossless block transfer, `gguf_requant` Q6_K,
`gguf_tokenizer`, `gguf_rope`).
"""

from .core import convert
from .errors import ConvertError, InterruptedAfterPublishing
from .output import Report
from .policy import RECIPES, Policy

__all__ = ["convert", "ConvertError", "InterruptedAfterPublishing", "Report", "RECIPES", "Policy"]
