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


def preset(name: str) -> TextConfig:
    key = name.lower().removeprefix("gemma-4-").removesuffix("-it")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return TextConfig.from_dict(dict(PRESETS[key]), source=f"preset {key}")
