"""What differs when the source is a Gemma 4 MTP drafter (`gemma4_assistant`).

The pipeline (streaming, encoding, atomic output) is `core`'s; this module gives it
the drafter's module tree to check shapes against and the key clean-up that
`loader.load_drafter` applies, so that a converted folder loads with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.config import ConfigError
from gemma4_mlx.checkpoint.files import LoadError, read_safetensors, weight_files
from gemma4_mlx.checkpoint.keys import DRAFTER_UNUSED_KEYS, TOKEN_ORDERING_KEY
from gemma4_mlx.models.assistant import AssistantConfig, Drafter

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
    """(raw config, lazily built `Drafter`, key clean-up) for `core._convert`."""
    cfg_file = folder / "config.json"
    raw = json.loads(cfg_file.read_text())
    try:
        cfg = AssistantConfig.from_dict(raw, str(cfg_file))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    # As the loader: the tensors, not the config, say whether there is a centroid
    # head (spec mtp-drafter §1: some configs declare centroids the files lack).
    cfg.use_ordered_embeddings = _has_centroids(folder)
    return raw, Drafter(cfg), clean


def clean(weights: dict[str, mx.array], stats: dict | None = None) -> dict[str, mx.array]:
    """Drop the K/V projections and norms a drafter never uses (it reads the
    target's K/V); everything else keeps its name.  lm_head.weight passes through
    for core's tied-head check."""
    out = {k: v for k, v in weights.items() if not DRAFTER_UNUSED_KEYS.search(k)}
    if stats is not None:
        stats["unused_kv"] = stats.get("unused_kv", 0) + len(weights) - len(out)
    return out


def _has_centroids(folder: Path) -> bool:
    try:
        return any(TOKEN_ORDERING_KEY in read_safetensors(f) for f in weight_files(folder))
    except LoadError as e:
        raise ConvertError(str(e)) from None
