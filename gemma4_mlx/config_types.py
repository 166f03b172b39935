"""The JSON types of config.json fields (docs/hardening.md §4), and the one error type of
config reading.  Every field a config class reads is checked against its dataclass
annotation before use, so a wrong JSON type is one ConfigError line, never a TypeError
deep in `TextConfig.resolve`."""

from __future__ import annotations

import dataclasses
import json


class ConfigError(ValueError):
    """A config.json that cannot describe a Gemma 4 text model."""


_JSON_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict, "list": list}
_POSITIVE = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "sliding_window",
    "max_position_embeddings", "num_experts", "top_k_experts",
    "moe_intermediate_size", "patch_size", "pooling_kernel_size", "position_embedding_size", "conv_kernel_size",
    "attention_chunk_size", "num_mel_bins", "output_proj_dims",
}  # fmt: skip


def accepts(annotation: str, value) -> bool:
    """Whether JSON `value` fits a dataclass field annotation ("int | None", "list", ...);
    booleans are not numbers, integers are floats."""
    for name in (t.strip() for t in str(annotation).split("|")):
        base = name.split("[")[0]
        if name == "None" and value is None or base == "Any":
            return True
        want = _JSON_TYPES.get(base)
        if base == "tuple":  # AudioConfig's pairs come as JSON lists
            want = (list, tuple)
        if want is not None and isinstance(value, want) and (base == "bool" or not isinstance(value, bool)):
            return True
    return False


def check_types(cls, d: dict, source: str) -> None:
    """ConfigError naming the first field of `d` whose JSON type `cls` cannot take, or
    whose count is not positive; a field that is `None` where allowed keeps its default."""
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if not accepts(f.type, v):
            raise ConfigError(f"{source}: {f.name} must be {f.type}, got {type(v).__name__} {json.dumps(v)[:40]}")
        if f.name in _POSITIVE and isinstance(v, int) and v < 1:
            raise ConfigError(f"{source}: {f.name} must be a positive integer, got {v}")


def check_text(d: dict, source: str) -> None:
    """The nested fields of a text config: lists and mappings of the right element types."""
    types = d.get("layer_types")
    if types is not None and not all(isinstance(t, str) for t in types):
        raise ConfigError(f"{source}: layer_types must be a list of strings")
    rope = d.get("rope_parameters")
    if rope is not None and not all(isinstance(v, dict) or v is None for v in rope.values()):
        raise ConfigError(f"{source}: rope_parameters must map layer types to objects")
    for k, o in (d.get("per_layer_config") or {}).items():  # the overrides `resolve` reads
        read = [o.get(x) for x in ("head_dim", "num_key_value_heads")] if isinstance(o, dict) else [None]
        if not (
            str(k).isdigit() and isinstance(o, dict) and all(v is None or accepts("int", v) and v > 0 for v in read)
        ):
            raise ConfigError(
                f"{source}: per_layer_config[{k!r}] must map a layer index to positive head_dim / num_key_value_heads"
            )
    eos = d.get("eos_token_id")
    if not (eos is None or accepts("int", eos) or (isinstance(eos, list) and all(accepts("int", e) for e in eos))):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list of integers")
