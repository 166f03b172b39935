"""Gemma 4 12B "unified": the embedders that stand in for the towers (docs/unified.md §3).

The 12B has no vision or audio encoder.  An image soft token is one merged
48x48x3 pixel patch sent through LayerNorm -> Dense -> LayerNorm, plus a factorised
2-D position embedding, LayerNorm, then the shared multimodal embedder (weightless
RMSNorm -> projection into the decoder's width).  An audio soft token is one raw
frame of 640 waveform samples through that same embedder.  Parameter names follow
the checkpoint (`model.embed_vision.*` -> `vision.*`, `model.embed_audio.*` ->
`audio.*`), so loading only strips the prefix.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx.config import UnifiedAudioConfig, UnifiedVisionConfig
from gemma4_mlx.models.layers import MultimodalEmbedder

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default; the reference sets no other


class LayerNorm(nn.Module):
    """Affine LayerNorm in float32 with a two-pass variance: the first one normalises raw
    pixels (mean ~0.5), where E[x^2] - E[x]^2 would lose digits (docs/unified.md §3)."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        x32 = x.astype(mx.float32)
        c = x32 - mx.mean(x32, axis=-1, keepdims=True)
        y = c * mx.rsqrt(mx.mean(c * c, axis=-1, keepdims=True) + LAYER_NORM_EPS)
        return (y * self.weight.astype(mx.float32) + self.bias.astype(mx.float32)).astype(x.dtype)


class PatchEmbedder(nn.Module):
    """The checkpoint's `vision_embedder`: merged pixel patches [N, L, 3 (k p)^2] plus
    their (x, y) positions -> [N, L, mm_embed_dim] (before the multimodal embedder)."""

    def __init__(self, cfg: UnifiedVisionConfig):
        super().__init__()
        D = cfg.mm_embed_dim
        self.patch_ln1 = LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, D, bias=True)
        self.patch_ln2 = LayerNorm(D)
        self.pos_embedding = mx.zeros((cfg.mm_posemb_size, 2, D))  # [position, axis (x, y), D]
        self.pos_norm = LayerNorm(D)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """A padding row (position (-1, -1)) gets no position term, as in the reference."""
        table = self.pos_embedding  # never quantized: its dtype is the working dtype
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.astype(table.dtype))))
        pos = mx.maximum(position_ids, 0)
        valid = (position_ids != -1).astype(table.dtype)[..., None]  # [N, L, 2, 1]
        pe = table[pos[..., 0], 0] * valid[..., 0, :] + table[pos[..., 1], 1] * valid[..., 1, :]
        return self.pos_norm(x + pe)


class UnifiedVision(nn.Module):
    """`Model.vision` of a unified checkpoint, what `media.prepare` calls the vision tower:
    `vision_embedder` then `embed_vision` (weightless RMSNorm -> projection to the text width)."""

    def __init__(self, cfg: UnifiedVisionConfig, text_hidden: int):
        super().__init__()
        self.config = cfg
        self.vision_embedder = PatchEmbedder(cfg)
        self.embed_vision = MultimodalEmbedder(cfg.mm_embed_dim, text_hidden, cfg.rms_norm_eps)

    def embed(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """Every row [N, L, H], padding rows included."""
        return self.embed_vision(self.vision_embedder(pixel_values, position_ids))

    def __call__(self, pixel_values, position_ids) -> tuple[mx.array, list[int]]:
        """Soft tokens of every image's real (non-padding) patches, concatenated
        [sum(counts), H], and the per-image counts (the towers' interface)."""
        pos = np.asarray(position_ids)
        if pos.max(initial=-1) >= self.config.mm_posemb_size:
            raise ValueError(
                f"patch position {int(pos.max())} outside the position table ({self.config.mm_posemb_size} per axis)"
            )
        real = (pos != -1).all(axis=-1)
        counts = real.sum(axis=-1).tolist()
        idx = np.flatnonzero(real.reshape(-1))  # only real rows are embedded
        pv = np.asarray(pixel_values).reshape(-1, pixel_values.shape[-1])[idx]
        return self.embed(mx.array(pv)[None], mx.array(pos.reshape(-1, 2)[idx])[None])[0], counts


class UnifiedAudio(nn.Module):
    """`Model.audio` of a unified checkpoint: raw waveform frames -> soft tokens through
    the checkpoint's `embed_audio` (weightless RMSNorm -> projection)."""

    def __init__(self, cfg: UnifiedAudioConfig, text_hidden: int):
        super().__init__()
        self.config = cfg
        self.embed_audio = MultimodalEmbedder(cfg.audio_embed_dim, text_hidden, cfg.rms_norm_eps)

    def soft_tokens(self, frames, mask) -> mx.array:
        """Valid frames of all clips in order [sum of counts, H] (what `media.prepare` asks
        of an audio tower); frames [B, T, samples], mask [B, T]."""
        idx = np.flatnonzero(np.asarray(mask).reshape(-1))
        x = np.asarray(frames, np.float32).reshape(-1, self.config.audio_embed_dim)[idx]
        return self.embed_audio(mx.array(x))
