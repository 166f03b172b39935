"""The 12B unified model from llama.cpp's two GGUF files (docs/unified.md §9): its text
GGUF (an ordinary `gemma4` one, imported by `gguf`) plus the `clip` mmproj GGUF that holds
the vision and audio embedders (names and layouts: `gguf_names.MMPROJ`).

The embedders are small and are kept as stored (F32 / F16 / BF16), as `convert` keeps a
safetensors source's (docs/unified.md §8); a block-typed tensor (llama.cpp's
`--outtype q8_0` quantizes the 12B's wide ones) is decoded exactly to float32.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx.config import ModelConfig
from gemma4_mlx.models.text import Model

from .errors import ConvertError
from .gguf_blocks import dequantize, rows_map
from .gguf_names import mmproj_config, mmproj_tensor
from .gguf_read import FLOAT_TYPES, GGUFFile

# The wrapper config's media token ids, found in the text GGUF's vocabulary by their strings.
MEDIA_STRINGS = {
    "image_token_id": "<|image|>",
    "audio_token_id": "<|audio|>",
    "video_token_id": "<|video|>",
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
    "boa_token_id": "<|audio>",
    "eoa_token_index": "<audio|>",
}


def unified_config(mm: GGUFFile, text: dict, vocab) -> dict:
    """The gemma4_unified config.json around the text GGUF's config `text`; media ids from
    the vocabulary (the released ids when the GGUF carries none, the reference defaults)."""
    cfg = {
        "model_type": "gemma4_unified",
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "text_config": {**text, "model_type": "gemma4_unified_text"},
        **mmproj_config(mm, text["hidden_size"]),
    }
    if "eos_token_id" in text:
        cfg["eos_token_id"] = text["eos_token_id"]
    if vocab is not None:
        index = {t: i for i, t in enumerate(vocab.tokens)}
        missing = [s for s in MEDIA_STRINGS.values() if s not in index]
        if missing:
            raise ConvertError(f"{mm.path}: the text GGUF's vocabulary has no {missing[0]} token for media")
        cfg.update({k: index[s] for k, s in MEDIA_STRINGS.items()})
    return cfg


def embedders(mm: GGUFFile, config: ModelConfig) -> tuple[dict[str, mx.array], dict]:
    """(our vision.* / audio.* arrays, report entries of the matrices) from the mmproj,
    each checked against the shape the config gives it."""
    model = Model.from_config(config)  # lazy: only shapes are read
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if k.startswith(("vision.", "audio."))}
    side = config_side(config)
    arrays, entries = {}, {}
    for name, t in mm.tensors.items():
        key, values = mmproj_tensor(name, _values(mm, name), side)
        if key is None:
            raise ConvertError(f"{mm.path}: tensor {name}: unknown GGUF tensor name for a Gemma 4 12B mmproj")
        if values.shape != expected[key]:
            raise ConvertError(f"{mm.path}: tensor {name} has shape {values.shape}, config says {expected[key]}")
        a = mx.array(values)
        arrays[key] = a.view(mx.bfloat16) if t.type == "BF16" else a
        if key.endswith("embedding_projection.weight"):
            dtype = str(arrays[key].dtype).replace("mlx.core.", "")
            entry = {"class": "embedder", "format": "float", "dtype": dtype, "reason": f"mmproj {t.type}"}
            entries[key[: -len(".weight")]] = entry
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ConvertError(f"{mm.path}: tensor for {missing[0]} is missing")
    return arrays, entries


def config_side(config: ModelConfig) -> int:
    v = config.raw["vision_config"]
    return v["patch_size"] * v["pooling_kernel_size"]


def _values(mm: GGUFFile, name: str) -> np.ndarray:
    """The stored values (float types as stored, block types as their exact float32);
    `raw` refuses the ggml types we cannot read, naming the tensor."""
    t = mm.tensors[name]
    raw = mm.raw(name)
    if t.type in FLOAT_TYPES:
        return np.array(raw)
    return rows_map(raw, t.type, partial(dequantize, t.type))
