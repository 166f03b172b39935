"""Tiny Gemma 4 12B "unified" checkpoints and drafters written by transformers (docs/unified.md §7).

Odd sizes (text hidden 40, embedder width 24, frames of 20 samples, merged patches of
12 px) so a transposed or mis-sized tensor cannot pass; every weight, norm, bias,
layer scalar and the position table random.  The sliding window is 4 so that an
image block (6+ soft tokens) is longer than the window: the block mask must be
clipped by it, which is where transformers' two mask paths disagree (docs/unified.md §4).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from helpers.checkpoints import randomize

S, F = "sliding_attention", "full_attention"
W = 4

TEXT = dict(
    vocab_size=300,
    hidden_size=40,
    intermediate_size=72,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    global_head_dim=24,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    layer_types=[S, S, F] * 2,
    sliding_window=W,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
)
VISION = dict(patch_size=4, pooling_kernel_size=3, mm_embed_dim=24, mm_posemb_size=30, output_proj_dims=24)
AUDIO = dict(audio_embed_dim=20)
# media ids remapped inside the tiny vocabulary; eos a list, as released configs have
TOKEN_IDS = dict(
    boi_token_id=10,
    eoi_token_id=11,
    image_token_id=12,
    audio_token_id=13,
    video_token_id=14,
    boa_token_id=15,
    eoa_token_index=16,
)
EOS = [1, 106]


def hf_config(**text) -> transformers.Gemma4UnifiedConfig:
    cfg = transformers.Gemma4UnifiedConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**{**TEXT, **text}).to_dict(),
        vision_config=transformers.Gemma4UnifiedVisionConfig(**VISION).to_dict(),
        audio_config=transformers.Gemma4UnifiedAudioConfig(**AUDIO).to_dict(),
        eos_token_id=EOS,
        **TOKEN_IDS,
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize_embedders(hf, seed: int) -> None:
    """LayerNorm weights U(0.5, 1.5) and biases N(0, 0.1); the rest N(0, 0.1); the
    position table N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (hf.model.embed_vision, hf.model.embed_audio):
            for name, p in part.named_parameters():
                if "ln" in name or "norm" in name:
                    if name.endswith("weight"):
                        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                    else:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif name == "pos_embedding":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build_hf(seed: int = 0, **text):
    torch.manual_seed(seed)
    hf = transformers.Gemma4UnifiedForConditionalGeneration(hf_config(**text)).eval()
    randomize(hf.model.language_model, seed + 1)
    randomize_embedders(hf, seed + 2)
    hf.lm_head.weight = hf.model.language_model.embed_tokens.weight  # tied, as saved
    return hf


def hf_drafter(seed: int = 0, centroid: bool = False):
    """A `gemma4_unified_assistant` for the tiny target: K/V layout of the target's
    producer layers, backbone width 40, its own width 32."""
    text = transformers.Gemma4UnifiedTextConfig(
        **{
            **TEXT,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "layer_types": [S, S, S, F],
            "num_kv_shared_layers": 4,
            "final_logit_softcapping": None,
        }
    )
    cfg = transformers.Gemma4UnifiedAssistantConfig(
        text_config=text.to_dict(),
        backbone_hidden_size=TEXT["hidden_size"],
        use_ordered_embeddings=centroid,
        num_centroids=20,
        centroid_intermediate_top_k=4,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    randomize(hf, seed)
    if centroid:
        hf.masked_embedding.token_ordering.copy_(torch.tensor(np.random.default_rng(seed).permutation(300)))
    return hf


def type_ids(ids: list[int]) -> list[int]:
    """mm_token_type_ids as transformers' processor makes them: 1 image, 2 video, 3 audio."""
    kinds = {TOKEN_IDS["image_token_id"]: 1, TOKEN_IDS["video_token_id"]: 2, TOKEN_IDS["audio_token_id"]: 3}
    return [kinds.get(i, 0) for i in ids]


def trained_mask_logits(hf, **inputs) -> np.ndarray:
    """Logits with the mask the model was trained with (docs/unified.md §4): transformers'
    generate-time masks (`create_masks_for_generate`: full layers causal, sliding layers
    (causal or same image) and inside the window) handed to its forward."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids.clamp(max=hf.config.text_config.vocab_size - 1))
        masks = hf.create_masks_for_generate(
            hf.config,
            emb,
            None,
            None,
            torch.arange(ids.shape[1])[None],
            mm_token_type_ids=torch.tensor([type_ids(ids[0].tolist())]),
        )
        return hf(attention_mask=masks, **inputs).logits.float().numpy()


def _reference_image_module():
    """transformers' `image_processing_gemma4_unified`, imported without torchvision.

    The module needs torchvision only for its resize (`tvF.resize`) and a type hint;
    the rest (patchify, 3x3 merge, padding) is torch.  torchvision is not installed
    here, so the import sees a stand-in that has no `resize`: sizes at a resize fixed
    point run the reference's own `_preprocess`, any other size fails loudly."""
    import importlib
    import sys
    import types

    import transformers.image_processing_backends  # noqa: F401  (sees torchvision absent first)

    names = (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.v2",
        "torchvision.transforms.v2.functional",
    )
    stub = {n: types.ModuleType(n) for n in names}
    stub["torchvision.transforms.v2"].functional = stub[names[-1]]
    stub[names[-1]].InterpolationMode = object
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    sys.modules.update(stub)
    try:
        return importlib.import_module("transformers.models.gemma4_unified.image_processing_gemma4_unified")
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def reference_image_processor(img: np.ndarray, budget: int, patch_size: int = 16, pooling_kernel_size: int = 3):
    """`Gemma4UnifiedImageProcessor._preprocess` on one uint8 HxWx3 image (its defaults:
    rescale 1/255, no normalisation)."""
    cls = _reference_image_module().Gemma4UnifiedImageProcessor
    proc = object.__new__(cls)  # __init__ would insist on torchvision
    return proc._preprocess(
        [torch.from_numpy(img).permute(2, 0, 1)],
        do_resize=True,
        resample=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
        image_mean=None,
        image_std=None,
        return_tensors="pt",
        patch_size=patch_size,
        max_soft_tokens=budget,
        pooling_kernel_size=pooling_kernel_size,
    )


def IMAGE_PROMPT(seed: int = 0):  # noqa: N802  (a constant-like factory)
    """(ids, image): an 84x108 image (a resize fixed point: 7 x 9 = 63 soft tokens at
    budget 70) between a few text tokens."""
    img = np.random.default_rng(seed).integers(0, 256, (84, 108, 3), dtype=np.uint8)
    ids = [2, 40, 41, TOKEN_IDS["boi_token_id"]] + [TOKEN_IDS["image_token_id"]] * 63 + [TOKEN_IDS["eoi_token_id"], 50]
    return ids, img
