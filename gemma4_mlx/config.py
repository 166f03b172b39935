"""Gemma 4 text configuration: reads real hub `config.json` files.

Both serialisations are accepted (docs/text-decoder.md §2.2): the legacy
`global_head_dim` / `num_global_key_value_heads` keys of the released files and
the `per_layer_config` form written by newer transformers. Unknown keys are
ignored; missing core keys fall back to the *transformers* defaults (never
mlx-lm's, which are E2B-flavoured) with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_mlx.config_types import ConfigError, accepts, check_text, check_types

log = logging.getLogger(__name__)

SLIDING = "sliding_attention"
FULL = "full_attention"

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Keys whose absence almost certainly means a broken or foreign config.
_CORE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
)

SUPPORTED_TYPES = ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text")
UNIFIED = "gemma4_unified"  # Gemma 4 12B: no towers, patches and waveform frames go straight in (docs/unified.md)

# transformers' `Gemma4UnifiedTextConfig` defaults where they differ from `Gemma4TextConfig`'s
# (docs/unified.md §2).  The unified text config has no PLE and no MoE fields at all: a stray
# key of that name in its config.json is ignored there, so it is forced off here.
UNIFIED_TEXT_DEFAULTS = {
    "use_bidirectional_attention": "vision",
    "sliding_window": 1024,
    "max_position_embeddings": 262144,
}
UNIFIED_TEXT_FORCED = {"hidden_size_per_layer_input": 0, "enable_moe_block": False}


def unified_text(d: dict) -> dict:
    """A `gemma4_unified_text` dict as `TextConfig.from_dict` reads it."""
    return {**UNIFIED_TEXT_DEFAULTS, **d, **UNIFIED_TEXT_FORCED}


# config.json names them `<name>_token_id` (eoa also `eoa_token_index`).
MEDIA_TOKEN_IDS = {
    "image": 258880,
    "audio": 258881,
    "video": 258884,
    "boi": 255999,
    "eoi": 258882,
    "boa": 256000,
    "eoa": 258883,
}


@dataclass
class LayerSpec:
    """Resolved geometry of one decoder layer."""

    index: int
    type: str  # SLIDING or FULL
    head_dim: int
    kv_heads: int
    intermediate: int
    shared: bool  # KV consumer: computes only q, reads its producer's K/V
    k_eq_v: bool  # full layer without v_proj: V = v_norm(raw k)
    producer: int | None  # for consumers: the layer whose K/V they read


@dataclass
class TextConfig:
    # transformers 5.24 defaults (docs/text-decoder.md §2.1); they match no released model.
    vocab_size: int = 262144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: Any = 1
    bos_token_id: int = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int | None = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    model_type: str = "gemma4_text"
    layers: list[LayerSpec] = field(default_factory=list, repr=False)

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: dict, source: str = "config", kv_from_target: bool = False) -> TextConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"layers"}
        missing = [k for k in _CORE_KEYS if k not in d]
        if missing:
            log.warning("%s: missing %s; using transformers defaults", source, ", ".join(missing))
        check_types(cls, d, source)
        check_text(d, source)
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.resolve(source, kv_from_target)
        return cfg

    def resolve(self, source: str = "config", kv_from_target: bool = False) -> None:
        """Derive the per-layer geometry and validate the config.

        kv_from_target: an MTP drafter, whose layers all read K/V the *target*
        wrote; they have no producer inside this model.
        """
        L = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L)]
            self.layer_types[-1] = FULL
        if len(self.layer_types) != L:
            raise ConfigError(f"{source}: layer_types has {len(self.layer_types)} entries, num_hidden_layers is {L}")
        bad = {t for t in self.layer_types if t not in (SLIDING, FULL)}
        if bad:
            raise ConfigError(f"{source}: unknown layer type(s) {sorted(bad)}")
        if self.layer_types[-1] != FULL:  # transformers forces it, with a warning: the reference wins
            log.warning("%s: the last layer must use full attention; reading it as full, as transformers does", source)
            self.layer_types = [*self.layer_types[:-1], FULL]
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in DEFAULT_ROPE.items()}
        if self.use_bidirectional_attention == "all":
            raise ConfigError(f"{source}: use_bidirectional_attention='all' (encoder mode) is not supported")
        if not self.hidden_size_per_layer_input:
            self.hidden_size_per_layer_input = 0
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError(f"{source}: enable_moe_block needs num_experts, top_k_experts, moe_intermediate_size")
        N = self.num_kv_shared_layers or 0
        if not 0 <= N <= L:
            raise ConfigError(f"{source}: num_kv_shared_layers={N} outside 0..{L}")
        overrides = {int(k): v for k, v in (self.per_layer_config or {}).items()}
        first_shared = L - N
        producers = {}
        for i in range(first_shared):
            producers[self.layer_types[i]] = i
        self.layers = []
        for i, t in enumerate(self.layer_types):
            o = overrides.get(i, {})
            if "head_dim" in o:
                d = o["head_dim"]
            elif t == FULL and self.per_layer_config is None:  # legacy form: global_head_dim
                d = self.global_head_dim
            else:  # transformers 5.24's form: per_layer_config alone decides (as it does there)
                d = self.head_dim
            if "num_key_value_heads" in o:
                kv = o["num_key_value_heads"]
            elif t == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
                kv = self.num_global_key_value_heads
            else:
                kv = self.num_key_value_heads
            shared = i >= first_shared
            width = self.intermediate_size * (2 if self.use_double_wide_mlp and shared else 1)
            producer = producers.get(t) if shared else None
            if shared and producer is None and not kv_from_target:
                raise ConfigError(f"{source}: KV-shared layer {i} ({t}) has no producer layer of its type")
            if self.num_attention_heads % kv:
                raise ConfigError(
                    f"{source}: layer {i}: {self.num_attention_heads} heads not divisible by {kv} KV heads"
                )
            self.layers.append(LayerSpec(i, t, d, kv, width, shared, self.attention_k_eq_v and t == FULL, producer))

    # ---------------------------------------------------------------- derived
    @property
    def first_shared(self) -> int:
        return self.num_hidden_layers - (self.num_kv_shared_layers or 0)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def rope_for(self, layer_type: str) -> dict:
        return {**DEFAULT_ROPE[layer_type], **(self.rope_parameters.get(layer_type) or {})}

    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def to_dict(self) -> dict:
        """Legacy hub form (what released files and MLX peers read)."""
        d = dataclasses.asdict(self)
        d.pop("layers")
        d.pop("per_layer_config")
        full = [s for s in self.layers if s.type == FULL]
        if full:
            d["global_head_dim"] = full[0].head_dim
            if self.attention_k_eq_v:
                d["num_global_key_value_heads"] = full[0].kv_heads
        return d


@dataclass
class ModelConfig:
    """The top-level config: text part plus the multimodal wrapper's extras."""

    text: TextConfig
    model_type: str
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def media_ids(self) -> dict[str, int]:
        """Multimodal token ids (docs/multimodal.md §1.1), from the wrapper config."""
        r = {k: v for k, v in self.raw.items() if v is not None}  # null: the default (parse_config typed the rest)
        out = {k: int(r.get(k + "_token_id", d)) for k, d in MEDIA_TOKEN_IDS.items()}
        out["eoa"] = int(r.get("eoa_token_id", r.get("eoa_token_index", out["eoa"])))
        return out

    @property
    def unified(self) -> bool:
        """Gemma 4 12B "unified" (docs/unified.md): media enter through embedders, not towers."""
        return self.model_type == UNIFIED

    @property
    def eos_ids(self) -> list[int]:
        wrapper = self.raw.get("eos_token_id")
        if wrapper is not None:
            return [wrapper] if isinstance(wrapper, int) else list(wrapper)
        return self.text.eos_ids


def parse_config(d: dict, source: str = "config.json") -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    for key in [k for k in d if k.endswith(("_token_id", "_token_index"))] + ["eos_token_id"]:
        v = d.get(key)
        if not (
            v is None
            or accepts("int", v)
            or (key == "eos_token_id" and isinstance(v, list) and all(accepts("int", e) for e in v))
        ):
            raise ConfigError(f"{source}: {key} must be an integer, got {type(v).__name__}")
    for key in ("vision_config", "audio_config"):
        if not isinstance(d.get(key), (dict, type(None))):
            raise ConfigError(f"{source}: {key} must be an object or null, got {type(d[key]).__name__}")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; expected one of {SUPPORTED_TYPES}")
    text = d.get("text_config") if model_type in ("gemma4", UNIFIED) else d
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type {model_type!r} without a text_config")
    if model_type.startswith(UNIFIED):
        text = unified_text(text)
    return ModelConfig(TextConfig.from_dict(text, source), model_type, d)


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        d = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return parse_config(d, str(file))


# -- the towers and the MTP drafter ------------------------------------------


@dataclass
class VisionConfig:
    # transformers 5.24 `Gemma4VisionConfig` defaults; released configs set every field.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    default_output_length: int | None = None  # config.json only; a budget fallback (docs/multimodal.md §2.1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        """Read the `vision_config` block of a config.json; unknown keys are ignored."""
        check_types(cls, {k: v for k, v in d.items() if v is not None}, "vision_config")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") not in ("default", "axial"):
            raise ValueError(
                f"vision_config: unsupported rope_type {rope['rope_type']!r} (the Gemma 4 tower uses 2-D axial RoPE)"
            )
        cfg.rope_theta = float(rope.get("rope_theta", d.get("rope_theta") or cfg.rope_theta))
        if cfg.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"vision_config: unsupported hidden_activation {cfg.hidden_activation!r}")
        if cfg.head_dim % 4:
            raise ValueError(f"vision_config: head_dim {cfg.head_dim} must be divisible by 4 (2-D RoPE)")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError("vision_config: num_attention_heads must be a multiple of num_key_value_heads")
        return cfg


AUDIO_ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_pytorch_tanh")  # models/audio.py maps them


@dataclass(frozen=True)
class AudioConfig:
    """The `audio_config` block of config.json (transformers 5.24 defaults = the E2B/E4B values)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    num_mel_bins: int = 128  # not in audio_config: the feature extractor's feature_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AudioConfig:
        check_types(cls, d, "audio_config")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("audio_config: hidden_size must be divisible by num_attention_heads")
        if len(cfg.subsampling_conv_channels) != 2:
            raise ValueError("audio_config: subsampling_conv_channels must have two entries")
        if cfg.hidden_act not in AUDIO_ACTIVATIONS:
            raise ValueError(f"audio_config: unsupported hidden_act {cfg.hidden_act!r}")
        if cfg.attention_context_left < 2:
            raise ValueError("audio_config: attention_context_left must be >= 2")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


ASSISTANT_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


@dataclass
class AssistantConfig:
    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> AssistantConfig:
        kind = d.get("model_type")
        if kind not in ASSISTANT_TYPES:
            raise ConfigError(
                f"{source}: model_type {kind!r} is not a Gemma 4 drafter (expected one of {ASSISTANT_TYPES})"
            )
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: {kind} without a text_config")
        # the 12B drafter's layers are `gemma4_unified_text` ones (same modules, other defaults)
        text = unified_text(text) if kind == "gemma4_unified_assistant" else dict(text)
        if not text.get("num_kv_shared_layers"):  # the reference forces "all layers shared"
            text["num_kv_shared_layers"] = text.get("num_hidden_layers", 4)
        t = TextConfig.from_dict(text, source, kv_from_target=True)
        if t.first_shared != 0:
            raise ConfigError(
                f"{source}: every drafter layer must read the target's K/V "
                f"(num_kv_shared_layers={t.num_kv_shared_layers}, layers={t.num_hidden_layers})"
            )
        for key in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
            if getattr(t, key):
                raise ConfigError(f"{source}: a drafter cannot have {key}={getattr(t, key)!r}")
        if "backbone_hidden_size" not in d:
            raise ConfigError(f"{source}: missing backbone_hidden_size (the target's hidden size)")
        return cls(
            t,
            int(d["backbone_hidden_size"]),
            bool(d.get("use_ordered_embeddings", False)),
            int(d.get("num_centroids", 2048)),
            int(d.get("centroid_intermediate_top_k", 32)),
            d,
        )


# -- Gemma 4 12B "unified": the embedders that replace the towers (docs/unified.md §3) --------


@dataclass(frozen=True)
class UnifiedVisionConfig:
    """`vision_config` of a gemma4_unified config.json (transformers 5.25 defaults = the 12B's)."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifiedVisionConfig:
        check_types(cls, {k: v for k, v in d.items() if v is not None}, "vision_config")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if min(cfg.patch_size, cfg.pooling_kernel_size, cfg.mm_embed_dim, cfg.mm_posemb_size) <= 0:
            raise ValueError("vision_config: patch_size, pooling_kernel_size, mm_embed_dim, mm_posemb_size must be > 0")
        if cfg.output_proj_dims != cfg.mm_embed_dim:  # the reference's embedder reads mm_embed_dim rows
            raise ValueError(
                f"vision_config: output_proj_dims {cfg.output_proj_dims} must equal mm_embed_dim {cfg.mm_embed_dim}"
            )
        return cfg

    @property
    def model_patch_size(self) -> int:
        """Side in pixels of one soft token's merged patch (48 on the 12B)."""
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size**2 * 3


@dataclass(frozen=True)
class UnifiedAudioConfig:
    """`audio_config` of a gemma4_unified config.json: one soft token per raw frame of
    `audio_embed_dim` samples (640 = 40 ms at 16 kHz on the 12B)."""

    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifiedAudioConfig:
        check_types(cls, {k: v for k, v in d.items() if v is not None}, "audio_config")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if cfg.audio_embed_dim <= 0:
            raise ValueError(f"audio_config: audio_embed_dim must be > 0, got {cfg.audio_embed_dim}")
        return cfg
