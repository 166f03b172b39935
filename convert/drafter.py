"""What differs when the source is a Gemma 4 MTP drafter (`gemma4_assistant`).

The pipeline (streaming, encoding, atomic output) is `core`'s; this module gives it
the drafter's module tree to check shapes against and the key mapper that
`checkpoint.load.load_drafter` applies (`checkpoint.keys.sanitize_drafter`), so that a
converted folder loads with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemma4_mlx.checkpoint.files import LoadError, read_safetensors, weight_files
from gemma4_mlx.checkpoint.keys import TOKEN_ORDERING_KEY, sanitize_drafter
from gemma4_mlx.config import AssistantConfig, ConfigError
from gemma4_mlx.models.assistant import Drafter

from .errors import ConvertError

MODEL_TYPE = "gemma4_assistant"


def is_drafter(folder: Path) -> bool:
    """True if config.json names a drafter; a missing or bad file is left to the
    target path, whose reader gives the one-line error."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


def source(folder: Path):
    """(raw config, lazily built `Drafter`, key mapper `(weights, stats=None)`) for `core._convert`."""
    cfg_file = folder / "config.json"
    raw = json.loads(cfg_file.read_text())
    try:
        cfg = AssistantConfig.from_dict(raw, str(cfg_file))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    # As the loader: the tensors, not the config, say whether there is a centroid
    # head (docs/speculative.md §1: some configs declare centroids the files lack).
    cfg.use_ordered_embeddings = _has_centroids(folder)
    return raw, Drafter(cfg), sanitize_drafter


def _has_centroids(folder: Path) -> bool:
    try:
        return any(TOKEN_ORDERING_KEY in read_safetensors(f) for f in weight_files(folder))
    except LoadError as e:
        raise ConvertError(str(e)) from None
