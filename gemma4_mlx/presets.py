"""Released Gemma 4 text configurations (docs/text-decoder.md §3), legacy hub form."""

from gemma4_mlx.config import FULL, SLIDING, TextConfig

_COMMON = dict(
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    head_dim=256,
    global_head_dim=512,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    final_logit_softcapping=30.0,
    eos_token_id=[1, 106],
    bos_token_id=2,
    pad_token_id=0,
)


def _types(layers: int, period: int) -> list[str]:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(layers)]


PRESETS: dict[str, dict] = {
    "e2b": dict(
        _COMMON,
        hidden_size=1536,
        num_hidden_layers=35,
        layer_types=_types(35, 5),
        num_attention_heads=8,
        num_key_value_heads=1,
        sliding_window=512,
        intermediate_size=6144,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=20,
        max_position_embeddings=131072,
    ),
    "e4b": dict(
        _COMMON,
        hidden_size=2560,
        num_hidden_layers=42,
        layer_types=_types(42, 6),
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=512,
        intermediate_size=10240,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=18,
        max_position_embeddings=131072,
    ),
    "26b-a4b": dict(
        _COMMON,
        hidden_size=2816,
        num_hidden_layers=30,
        layer_types=_types(30, 6),
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        sliding_window=1024,
        intermediate_size=2112,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        use_bidirectional_attention="vision",
        max_position_embeddings=262144,
    ),
    "31b": dict(
        _COMMON,
        hidden_size=5376,
        num_hidden_layers=60,
        layer_types=_types(60, 6),
        num_attention_heads=32,
        num_key_value_heads=16,
        num_global_key_value_heads=4,
        attention_k_eq_v=True,
        sliding_window=1024,
        intermediate_size=21504,
        hidden_size_per_layer_input=0,
        use_bidirectional_attention="vision",
        max_position_embeddings=262144,
    ),
}


# Gemma 4 12B "unified" (docs/unified.md §2): the text stack of `gemma4_unified`, which has
# no PLE, no MoE and no KV sharing; kept apart from PRESETS, whose four entries are the
# tower-based family.  Its embedders' shape is UNIFIED_MEDIA (the config's vision/audio blocks).
UNIFIED_PRESETS: dict[str, dict] = {
    "12b": dict(
        _COMMON,
        hidden_size=3840,
        num_hidden_layers=48,
        layer_types=_types(48, 6),
        num_attention_heads=16,
        num_key_value_heads=8,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=1024,
        intermediate_size=15360,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_bidirectional_attention="vision",
        max_position_embeddings=262144,
    ),
}
UNIFIED_MEDIA = {
    "12b": {
        "vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "mm_embed_dim": 3840, "mm_posemb_size": 1120},
        "audio_config": {"audio_embed_dim": 640},
    }
}


# The 12B's MTP drafter (google/gemma-4-12B-it-assistant).  Its config.json is not in our
# references: this is the 26B/31B drafters' layout (4 query-only layers of width 1024, MLP
# 8192) on the 12B's K/V geometry; it gives 422.8 M parameters, the card's "423M".
UNIFIED_DRAFTERS: dict[str, dict] = {
    "12b": {
        "model_type": "gemma4_unified_assistant",
        "backbone_hidden_size": 3840,
        "use_ordered_embeddings": False,
        "text_config": dict(
            _COMMON,
            hidden_size=1024,
            intermediate_size=8192,
            num_hidden_layers=4,
            layer_types=[SLIDING] * 3 + [FULL],
            num_attention_heads=16,
            num_key_value_heads=8,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=1024,
            num_kv_shared_layers=4,
            final_logit_softcapping=None,
            use_bidirectional_attention=None,
        ),
    }
}


def preset(name: str) -> TextConfig:
    key = name.lower().removeprefix("gemma-4-").removesuffix("-it")
    table = PRESETS if key in PRESETS else UNIFIED_PRESETS
    if key not in table:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join([*PRESETS, *UNIFIED_PRESETS])}")
    return TextConfig.from_dict(dict(table[key]), source=f"preset {key}")


def unified_config(name: str = "12b") -> dict:
    """A whole `gemma4_unified` config.json dict of a released shape (text, vision, audio)."""
    key = name.lower().removeprefix("gemma-4-").removesuffix("-it")
    if key not in UNIFIED_PRESETS:
        raise KeyError(f"unknown unified preset {name!r}; known: {', '.join(UNIFIED_PRESETS)}")
    return {"model_type": "gemma4_unified", "text_config": dict(UNIFIED_PRESETS[key]), **UNIFIED_MEDIA[key]}
