"""Checkpoint key mapping: HF, mlx-lm/mlx-vlm and our converted layouts onto `Model`
(the quirks of each live here, beside the module tree they map onto).

Every key mapper follows one contract: `sanitize(weights, [what it maps onto], stats=None)
-> dict[str, mx.array]`: checkpoint tensors in, a new dict named by our module paths out
(`weights` is not changed); the second argument, where the mapping depends on one, is
the model or config; `stats`, where the mapper keeps counts, adds what was left out, by
reason.  The mappers: `sanitize` (a target), `sanitize_drafter` (an MTP drafter) here,
`models.vision.sanitize(weights, cfg)` and `models.audio.sanitize(weights)` (the towers).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.models.audio import sanitize as audio_sanitize
from gemma4_mlx.models.text import Model
from gemma4_mlx.models.vision import sanitize as vision_sanitize

log = logging.getLogger(__name__)

# K/V tensors of a KV-shared layer (group 1: its index).  Such a layer computes queries
# only and reads its producer's K/V, yet official E2B/E4B files carry K/V for the
# target's shared layers, and MTP drafters (every layer shared, the producers are the
# target's) for all of theirs: the loaders and converters drop them.  (Our v_norm has
# no weight: a target's v_norm tensors, shared layer or not, are dropped by `_SKIP` first.)
SHARED_KV_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
# An MTP drafter's centroid head: its token permutation.
TOKEN_ORDERING_KEY = "masked_embedding.token_ordering"


# -- checkpoint quirks ------------------------------------------------------

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
_SKIP = re.compile(r"^(model\.)?multi_modal_projector\.|rotary_emb|\.v_norm\.")
# Tower tensors in checkpoint naming (HF `model.vision_tower.*`, mlx-vlm `vision_tower.*`)
# and in ours (`vision.vision_tower.*`, what `gemma4-mlx convert` writes).
_TOWER = re.compile(r"^(?:model\.)?(vision_tower|embed_vision|audio_tower|embed_audio|vision_embedder)\.")
# The 12B unified's embedders as transformers names them in memory (its save renames them back
# to the hub layout, which is also ours): docs/unified.md §3.
_UNIFIED_IN_MEMORY = (
    ("embed_vision.multimodal_embedder.", "embed_vision."),
    ("embed_vision.", "vision_embedder."),
)
_OURS = re.compile(r"^(vision|audio)\.")


def rename(key: str) -> str:
    """Checkpoint key (or module path) -> our module tree: strip the wrapper prefix;
    mlx-community stacks experts as `experts.switch_glu.*` (mlx-vlm/mlx-lm SwitchGLU)."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    if ".experts.switch_glu." in key:
        return key.replace(".experts.switch_glu.", ".experts.")
    return key.replace(".switch_glu.", ".experts.")


def module_path(key: str) -> str:
    """A checkpoint module path (mlx-vlm per-module quantization entries) -> ours;
    tower paths gain their owner (`vision_tower.x` -> `vision.vision_tower.x`)."""
    m = _TOWER.match(key)
    if m:
        owner = "vision" if "vision" in m.group(1) else "audio"
        return f"{owner}.{key[m.start(1) :]}"
    return rename(key)


def unified_name(key: str) -> str:
    """A 12B embedder key without `model.` -> the hub layout (`vision_embedder.*`,
    `embed_vision.embedding_projection`, `embed_audio.*`)."""
    if key.startswith("embed_vision.embedding_projection."):
        return key
    for old, new in _UNIFIED_IN_MEMORY:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def sanitize(weights: dict[str, mx.array], model: Model, stats: dict | None = None) -> dict[str, mx.array]:
    """Map checkpoint keys onto `Model` (docs/text-decoder.md §8.3).

    stats, if given, counts what was left out: "skipped" (vision/audio/rotary
    tensors) and "shared_kv" (unused K/V of KV-shared layers).
    """
    cfg = model.config
    out, towers = {}, {"vision": {}, "audio": {}}
    dropped_shared = skipped = 0
    for key, value in weights.items():
        tower = _TOWER.match(key) or _OURS.match(key)
        if tower:
            name = "vision" if "vision" in tower.group(1) else "audio"
            if name not in model:  # text-only model (or a checkpoint with extra towers)
                skipped += 1
            elif _OURS.match(key):
                out[key] = value
            elif model.unified:  # 12B embedders: hub names kept, owner prefixed (docs/unified.md §3)
                out[f"{name}.{unified_name(key[tower.start(1) :])}"] = value
            else:
                towers[name][key] = value
            continue
        key = rename(key)
        if _SKIP.search(key):
            skipped += 1
            continue
        if key == "lm_head.weight":
            out[key] = value  # checked against the embedding once every shard is read
            continue
        m = SHARED_KV_KEY.match(key)
        if m and int(m.group(1)) < len(cfg.layers) and cfg.layers[int(m.group(1))].shared:
            dropped_shared += 1  # official E2B/E4B files carry unused consumer K/V
            continue
        if key.endswith(".experts.gate_up_proj"):
            gate, up = mx.split(value, 2, axis=1)
            base = key[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = gate
            out[base + "up_proj.weight"] = up
            continue
        if key.endswith(".experts.down_proj"):
            key += ".weight"
        out[key] = value
    if towers["vision"]:
        vision = vision_sanitize(towers["vision"], model.vision.config)
        out.update(("vision." + k, v) for k, v in vision.items())
    if towers["audio"]:
        out.update(("audio." + k, v) for k, v in audio_sanitize(towers["audio"]).items())
    if dropped_shared:
        log.info("dropped %d unused KV-shared-layer tensors", dropped_shared)
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + skipped
        stats["shared_kv"] = stats.get("shared_kv", 0) + dropped_shared
    return out


def sanitize_drafter(weights: dict[str, mx.array], stats: dict | None = None) -> dict[str, mx.array]:
    """Map an MTP drafter checkpoint onto `Drafter`: drop the K/V tensors it never uses
    (every drafter layer reads the target's K/V); everything else keeps its name, and
    lm_head.weight passes through for the tied-head check.

    stats, if given, counts the dropped tensors as "unused_kv".
    """
    out = {k: v for k, v in weights.items() if not SHARED_KV_KEY.match(k)}
    if stats is not None:
        stats["unused_kv"] = stats.get("unused_kv", 0) + len(weights) - len(out)
    return out


def drop_tied_head(weights: dict[str, mx.array], folder: Path) -> None:
    """Gemma 4 models and drafters tie the head to `model.embed_tokens`: a stored
    `lm_head.weight` is dropped if it is an exact copy, refused otherwise."""
    head = weights.pop("lm_head.weight", None)
    if head is not None:
        emb = weights.get("model.embed_tokens.weight")
        if emb is None or emb.shape != head.shape or not mx.array_equal(emb, head).item():
            raise LoadError(f"{folder}: lm_head.weight differs from embed_tokens.weight; Gemma 4 ties them")


def drop_absent_towers(model: Model, weights: dict, folder: Path) -> None:
    """A tower that config.json declares but whose tensors are all absent is left out
    with a one-line notice (mlx-lm's text-only conversions keep `audio_config` and drop
    the tower); media for it then get a clear error.  A partly present tower stays a
    missing-tensor error."""
    for name in ("vision", "audio"):
        if name in model and not any(k.startswith(name + ".") for k in weights):
            del model[name]
            log.warning(
                "%s: config.json declares a%s %s tower but the checkpoint has none of its "
                "tensors; loaded without it (%s input is refused)",
                folder,
                "n" if name == "audio" else "",
                name,
                "image and video" if name == "vision" else name,
            )
