"""The Gemma 4 vision tower and its embedder into text space (docs/multimodal.md §2, §6, §7).

One module tree serves both released sizes: the small tower (E2B/E4B) clamps the
inputs and outputs of every linear with scalars from the checkpoint; the large
tower (26B/31B) has no clamps but standardises the soft tokens with
`std_bias`/`std_scale`.  Parameter paths follow the hub checkpoint with `model.`
stripped (`vision_tower.*`, `embed_vision.*`), so `sanitize` is mostly a filter.

Entry point: `VisionModel(pixel_values, pixel_position_ids)` takes the image
processor's padded arrays and returns the soft tokens of all images, already
projected to the text hidden size, concatenated in image order ([N, H_text]),
plus the per-image counts - exactly the rows that replace the `<|image|>`
placeholders of the prompt, in order.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx import ops, ops_vision
from gemma4_mlx.config import VisionConfig
from gemma4_mlx.models.layers import CLAMPS as _CLAMPS
from gemma4_mlx.models.layers import ClippableLinear, Linear, MultimodalEmbedder, RMSNorm


def axial_rope_tables(positions: mx.array, head_dim: int, theta: float, dtype) -> tuple[mx.array, mx.array]:
    """cos/sin [L, head_dim] for patch positions [L, 2] = (x, y).

    The first half of each head rotates with x (column), the second with y (row);
    each half uses head_dim/4 frequencies theta^(-2j/(head_dim/2)), laid out [f, f].
    """
    half = head_dim // 2
    inv = 1.0 / mx.power(mx.array(theta, mx.float32), mx.arange(0, half, 2, dtype=mx.float32) / half)
    angles = positions.astype(mx.float32)[..., None] * inv  # [L, 2, head_dim/4]

    def layout(t):
        return mx.concatenate([t[:, 0], t[:, 0], t[:, 1], t[:, 1]], axis=-1).astype(dtype)

    return layout(mx.cos(angles)), layout(mx.sin(angles))


def apply_axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, L, heads, d]: rotate-half inside each of the two halves, never across them."""
    B, L, h, d = x.shape
    q = x.reshape(B, L, h, 2, 2, d // 4)  # (half, quarter-of-half, freq)
    rotated = mx.concatenate([-q[..., 1:2, :], q[..., 0:1, :]], axis=-2).reshape(B, L, h, d)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, d, clip = cfg.hidden_size, cfg.head_dim, cfg.use_clipped_linears
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.eps = d, cfg.rms_norm_eps
        self.q_proj = ClippableLinear(H, self.n_heads * d, clip)
        self.k_proj = ClippableLinear(H, self.n_kv * d, clip)
        self.v_proj = ClippableLinear(H, self.n_kv * d, clip)
        self.o_proj = ClippableLinear(self.n_heads * d, H, clip)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def __call__(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim))
        v = ops.rms_norm(self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim), None, self.eps)
        q = apply_axial_rope(q, cos, sin).transpose(0, 2, 1, 3)
        k = apply_axial_rope(k, cos, sin).transpose(0, 2, 1, 3)
        # bidirectional, scale 1 (docs/multimodal.md §2.4)
        out = ops_vision.unmasked_attention(q, k, v.transpose(0, 2, 1, 3))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, inner, clip = cfg.hidden_size, cfg.intermediate_size, cfg.use_clipped_linears
        self.gate_proj = ClippableLinear(H, inner, clip)
        self.up_proj = ClippableLinear(H, inner, clip)
        self.down_proj = ClippableLinear(inner, H, clip)

    def __call__(self, x):
        return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x)))


class EncoderLayer(nn.Module):
    """Sandwich norms around attention and MLP; no final encoder norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def __call__(self, x, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    """h0 = input_proj(2 (pixels - 0.5)) + table[0][x] + table[1][y]; a Linear, not a conv."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = Linear(3 * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding_table = mx.zeros((2, cfg.position_embedding_size, cfg.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        table = self.position_embedding_table
        x = (2 * (pixels - 0.5)).astype(table.dtype)  # in the pixels' float32, then the weight dtype
        # table[0, ids], not table[0][ids]: MLX's integer index copies the whole [P, H] half first
        return self.input_proj(x) + table[0, positions[:, 0]] + table[1, positions[:, 1]]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = Encoder(cfg)
        if cfg.standardize:
            self.std_bias = mx.zeros((cfg.hidden_size,))
            self.std_scale = mx.ones((cfg.hidden_size,))

    def encode(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """Encoder output [L, hidden] of one image's real patches (padding removed).

        Padding patches are masked keys in the reference, so dropping them leaves
        every real row unchanged and needs no attention mask.
        """
        cfg = self.config
        h = self.patch_embedder(pixels, positions)[None]
        cos, sin = axial_rope_tables(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        return h[0]

    def pool(self, h: mx.array, positions: np.ndarray, dtype) -> mx.array:
        """k x k average pooling by patch position (k = pooling_kernel_size, never derived
        from the patch count), x sqrt(hidden), standardisation; all in float32 (docs/multimodal.md §2.5)."""
        cfg, k, f32 = self.config, self.config.pooling_kernel_size, ops.wide(dtype)
        bins = positions[:, 0] // k + (positions[:, 0].max() + 1) // k * (positions[:, 1] // k)
        n = int(bins.max()) + 1
        pooled = mx.zeros((n, h.shape[-1]), f32).at[mx.array(bins)].add(h.astype(f32))
        pooled = pooled / (k * k) * ops.const(math.sqrt(cfg.hidden_size), f32)
        if cfg.standardize:
            pooled = (pooled - self.std_bias.astype(f32)) * self.std_scale.astype(f32)
        return pooled.astype(dtype)


def real_patches(position_ids: np.ndarray, k: int, table_size: int) -> int:
    """Number of real patches of one image; checks the processor's layout (real patches
    first, then (-1, -1) padding; a full grid whose sides are multiples of k)."""
    real = (position_ids != -1).any(axis=-1)
    n = int(real.sum())
    if n == 0 or not real[:n].all():
        raise ValueError("pixel_position_ids: expected real patches first, then (-1, -1) padding")
    pos = position_ids[:n]
    if pos.min() < 0 or pos.max() >= table_size:
        raise ValueError(f"pixel_position_ids: positions must lie in [0, {table_size})")
    w, h = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
    if w % k or h % k or w * h != n or np.unique(pos[:, 0] + w * pos[:, 1]).size != n:
        raise ValueError(
            f"pixel_position_ids: patches must form a full grid with sides divisible by {k} "
            f"(got {n} patches spanning {w}x{h})"
        )
    return n


class VisionModel(nn.Module):
    """`vision_tower` + `embed_vision` of a Gemma 4 checkpoint."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.config = cfg
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = MultimodalEmbedder(cfg.hidden_size, text_hidden_size, cfg.rms_norm_eps)

    @property
    def dtype(self):
        return self.vision_tower.patch_embedder.position_embedding_table.dtype

    def soft_tokens(self, pixel_values, pixel_position_ids) -> tuple[mx.array, list[int]]:
        """Tower output before the embedder: [sum(counts), vision hidden], and counts."""
        pos_all = np.asarray(pixel_position_ids).astype(np.int64)
        if pos_all.ndim == 2:
            pos_all = pos_all[None]
        pixels_all = pixel_values if isinstance(pixel_values, mx.array) else mx.array(np.asarray(pixel_values))
        if pixels_all.ndim == 2:
            pixels_all = pixels_all[None]
        cfg = self.config
        if pixels_all.shape[:2] != pos_all.shape[:2] or pixels_all.shape[-1] != 3 * cfg.patch_size**2:
            raise ValueError(
                f"pixel_values {tuple(pixels_all.shape)} and pixel_position_ids "
                f"{pos_all.shape} do not match the tower (patch_size {cfg.patch_size})"
            )
        outs, counts = [mx.zeros((0, cfg.hidden_size), self.dtype)], []
        for i in range(pos_all.shape[0]):
            n = real_patches(pos_all[i], cfg.pooling_kernel_size, cfg.position_embedding_size)
            pos = pos_all[i, :n]
            h = self.vision_tower.encode(pixels_all[i, :n].astype(mx.float32), mx.array(pos))
            tokens = self.vision_tower.pool(h, pos, self.dtype)
            mx.eval(tokens)  # one image's activations at a time
            outs.append(tokens)
            counts.append(tokens.shape[0])
        return mx.concatenate(outs, axis=0), counts

    def __call__(self, pixel_values, pixel_position_ids) -> tuple[mx.array, list[int]]:
        """Soft-token embeddings in text space [sum(counts), H_text] and per-image counts."""
        tokens, counts = self.soft_tokens(pixel_values, pixel_position_ids)
        return self.embed_vision(tokens), counts

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """mlx-vlm's method form of `sanitize(weights, self.config)`."""
        return sanitize(weights, self.config)


_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.embed_vision.", "embed_vision."),
    ("embed_vision.", "embed_vision."),
)


def sanitize(weights: dict[str, mx.array], cfg: VisionConfig) -> dict[str, mx.array]:
    """Checkpoint tensors -> `VisionModel` paths (docs/multimodal.md §6.1, §6.3); non-vision
    keys dropped.  The key-mapper contract: `gemma4_mlx.checkpoint.keys`.

    Keeps only vision keys, strips `model.`, keeps the `.linear.` nesting of clipped
    linears, stores clamp scalars as float32 0-d arrays (dropped, like transformers
    does, when the config has no clipping), drops rotary buffers, and accepts a
    conv-shaped patch projection in either layout (PyTorch (out, 3, p, p) or MLX
    (out, p, p, 3)), flattened to the Linear's (pixel row, pixel column, channel) order.
    """
    out = {}
    for key, value in weights.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        else:
            continue
        if "rotary_emb." in key:
            continue
        if key.rsplit(".", 1)[-1] in _CLAMPS:
            if not cfg.use_clipped_linears:
                continue
            value = value.astype(mx.float32).reshape(())
        elif key.endswith("patch_embedder.input_proj.weight") and value.ndim == 4:
            if value.shape[1] == 3 and value.shape[-1] != 3:
                value = value.transpose(0, 2, 3, 1)
            value = value.reshape(value.shape[0], -1)
        out[key] = value
    return out
