"""Tiny multimodal Gemma 4 checkpoints written by transformers (docs/multimodal.md §8).

The vision tower comes in three flavours: "small" (E2B/E4B: clipped linears, no
standardisation), "large" (26B/31B: no clipping, standardisation) and "union"
(both, as the tiny parity config of docs/multimodal.md §8).  Every vision weight and buffer is
randomised - norm weights, the position table, the clamp scalars (finite, so the
clamps bind), std_bias/std_scale - because the defaults (ones, ±inf, zeros) hide bugs.
The whole `Gemma4ForConditionalGeneration` is saved with `save_pretrained`, so the
tests read the real key names (`model.vision_tower.*`, `model.embed_vision.*`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VISION_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=3,
    position_embedding_size=64,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
)

TOWERS = {
    "small": dict(use_clipped_linears=True, standardize=False),
    "large": dict(use_clipped_linears=False, standardize=True),
    "union": dict(use_clipped_linears=True, standardize=True),
}

# Text side: just big enough to own an embedder; hidden 48 != vision 32 catches transposes.
TEXT_TINY = dict(
    vocab_size=64,
    vocab_size_per_layer_input=64,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=16,
    layer_types=["full_attention"],
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    sliding_window=4,
)

# Multimodal ids remapped below the tiny vocabulary (docs/multimodal.md §8).
TOKEN_IDS = dict(
    boi_token_id=10,
    eoi_token_id=11,
    image_token_id=12,
    audio_token_id=13,
    video_token_id=14,
    boa_token_id=15,
    eoa_token_index=16,
)

CLAMP_NAMES = ("input_min", "input_max", "output_min", "output_max")


def hf_config(tower: str) -> transformers.Gemma4Config:
    vision = transformers.Gemma4VisionConfig(**VISION_TINY, **TOWERS[tower])
    text = transformers.Gemma4TextConfig(**TEXT_TINY)
    cfg = transformers.Gemma4Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None, **TOKEN_IDS
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize_vision(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    parts = (model.model.vision_tower, model.model.embed_vision)
    with torch.no_grad():
        for part in parts:
            for name, p in part.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # U(0.5, 1.5)
                elif "position_embedding_table" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            for name, b in part.named_buffers():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in CLAMP_NAMES:  # finite bounds in ±[0.5, 2.5): some values get clamped
                    mag = float(torch.rand((), generator=g)) * 2 + 0.5
                    b.fill_(-mag if leaf.endswith("min") else mag)
                elif leaf == "std_bias":
                    b.copy_(torch.randn(b.shape, generator=g))
                elif leaf == "std_scale":
                    b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def build_hf(tower: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(hf_config(tower)).eval()
    randomize_vision(model, seed)
    return model


def hf_image_processor(budget: int = 70, patch_size: int = 4):
    return transformers.Gemma4ImageProcessorPil(patch_size=patch_size, max_soft_tokens=budget, pooling_kernel_size=3)


def randomize_text(module, seed: int) -> None:
    """Text weights random: norms and router scales U(0.5, 1.5), layer scalars U(0.3, 1.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in module.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.3)


def randomize_audio(module, seed: int) -> None:
    """Every audio parameter random (norm weights U(0.5, 1.5)); clamp bounds finite (|b| in 1..3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in module.named_buffers():
            r = float(torch.rand((), generator=g)) * 2 + 1
            if name.endswith(("input_max", "output_max")):
                b.fill_(r)
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-r)


AUDIO_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    subsampling_conv_channels=[128, 8],
    conv_kernel_size=5,
    output_proj_dims=24,
    use_clipped_linears=True,
)


def build_multimodal(text: dict, tower: str = "union", seed: int = 0, **vision):
    """A whole `Gemma4ForConditionalGeneration`: text model, a vision tower, the audio
    tower; every text, vision and audio weight random (eager attention).  vision:
    overrides of VISION_TINY."""
    cfg = transformers.Gemma4Config(
        text_config=text,
        vision_config=transformers.Gemma4VisionConfig(**{**VISION_TINY, **vision}, **TOWERS[tower]).to_dict(),
        audio_config=transformers.Gemma4AudioConfig(**AUDIO_TINY).to_dict(),
        **TOKEN_IDS,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    randomize_text(hf.model.language_model, seed + 1)
    randomize_vision(hf, seed + 2)
    randomize_audio(hf.model.audio_tower, seed + 3)
    return hf


# -- a whole multimodal chat checkpoint (model, tokenizer) -------------------------
SPECIALS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<|image>": TOKEN_IDS["boi_token_id"],
    "<image|>": TOKEN_IDS["eoi_token_id"],
    "<|image|>": TOKEN_IDS["image_token_id"],
    "<|audio|>": TOKEN_IDS["audio_token_id"],
    "<|video|>": TOKEN_IDS["video_token_id"],
    "<|audio>": TOKEN_IDS["boa_token_id"],
    "<audio|>": TOKEN_IDS["eoa_token_index"],
    "<|turn>": 17,
    "<turn|>": 18,
    "<|channel>": 19,
    "<channel|>": 20,
    "<|think|>": 21,
    "<|tool_response>": 22,
}


def write_tokenizer(folder) -> None:

    vocab = dict(SPECIALS)
    for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"]):
        vocab[c] = 30 + i
    for i in range(300):
        if i not in vocab.values():
            vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)


def text_config(window: int, bidirectional: str | None = None, shared: int = 0) -> dict:
    """The tiny E2B-style text stack of the multimodal tests: window, bidirectional
    image attention ("vision" or None), KV-shared layers."""
    types = ["sliding_attention", "full_attention"] * 2 if shared else ["sliding_attention"] * 3 + ["full_attention"]
    return dict(
        vocab_size=300,
        vocab_size_per_layer_input=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        hidden_size_per_layer_input=8,
        sliding_window=window,
        layer_types=types,
        num_kv_shared_layers=shared,
        final_logit_softcapping=30.0,
        use_bidirectional_attention=bidirectional,
    )


def write_chat_checkpoint(path, **vision) -> Path:
    """A tiny E2B-style multimodal checkpoint (vision + audio towers, causal) with a
    character tokenizer whose special tokens carry its media ids, written to `path`.
    vision: overrides of VISION_TINY."""
    text = text_config(window=16)
    hf = build_multimodal(text, "small", **vision)
    hf.save_pretrained(path)
    write_tokenizer(path)
    return path
