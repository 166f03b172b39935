"""Gemma 4 audio encoder (USM-style Conformer) and audio embedder (docs/multimodal.md §4.3-§4.7).

Parameter names follow the checkpoint (`model.audio_tower.*`, `model.embed_audio.*`)
so `sanitize` only strips prefixes, transposes the two conv layouts and widens the
clamp scalars.  Input: log-mel features from `gemma4_mlx.media.audio`.

Local attention.  transformers splits the queries into blocks of 12 and gives each
block a 24-frame context with a Transformer-XL relative shift; the mask then leaves a
query at frame t the keys t-11 .. t.  We gather exactly those keys per query (a band
of `attention_context_left - 1` offsets) and add the relative term for offset o
directly: it is the projected sinusoid of position o + P - L, where
P = (chunk + left - 1 + right) // 2 + 1 is the length of transformers' position table
and L = attention_context_left (P == L in every released config, so position = o),
and zero where that position is negative.  Masked logits are -1e9 after the softcap,
so dropping the never-allowed context columns changes no valid output.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx import ops
from gemma4_mlx.config import AudioConfig
from gemma4_mlx.models.layers import CLAMPS, ClippableLinear, Linear, MultimodalEmbedder, RMSNorm

_ACTS = {"silu": ops.silu, "swish": ops.silu, "relu": nn.relu, "gelu": nn.gelu, "gelu_pytorch_tanh": ops.gelu_tanh}
NORM_EPS = 1e-6  # transformers builds the FFN and block norms with the default eps, not the config's


def _clamp(x: mx.array, limit: float) -> mx.array:
    """transformers' `gradient_clipping` clamp: a no-op in fp32/bf16 at 1e10, 65504 in fp16."""
    c = min(limit, float(mx.finfo(x.dtype).max))
    return mx.clip(x, -c, c)


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis with a weight and no bias, computed in fp32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        y = mx.fast.layer_norm(x.astype(ops.wide(x.dtype)), self.weight.astype(ops.wide(x.dtype)), None, self.eps)
        return y.astype(x.dtype)


class Conv2d(nn.Module):
    """3x3, stride 2, padding 1, no bias; weight in MLX layout (out, kh, kw, in)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = mx.zeros((cout, 3, 3, cin))

    def __call__(self, x):  # x: (B, T, F, C) channels-last
        return mx.conv2d(x, self.weight, stride=2, padding=1)


class SubsampleLayer(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.conv = Conv2d(cin, cout)
        self.norm = LayerNorm(cout, eps)

    def __call__(self, x, mask):
        x = x * mask[:, :, None, None].astype(x.dtype)
        return nn.relu(self.norm(self.conv(x))), mask[:, ::2]


def _ceil_half(n: int) -> int:
    return (n + 1) // 2


class SubsampleConvProjection(nn.Module):
    """SSCP: two stride-2 convs over (time, mel), flatten (mel, channel), project (docs/multimodal.md §4.4)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, cfg.rms_norm_eps)
        f = _ceil_half(_ceil_half(cfg.num_mel_bins))  # mel width after two stride-2 convs
        self.input_proj_linear = Linear(f * c1, cfg.hidden_size)

    def __call__(self, feats, mask):
        x = feats.astype(self.layer0.conv.weight.dtype)[..., None]
        x, mask = self.layer0(x, mask)
        x, mask = self.layer1(x, mask)
        B, T = x.shape[:2]
        return self.input_proj_linear(x.reshape(B, T, -1)), mask


class FeedForward(nn.Module):
    """Macaron half-step FFN: x + residual_weight * post_norm(W2 act(W1 pre_norm(x)))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.ffw_layer_1 = ClippableLinear(H, 4 * H, cfg.use_clipped_linears)
        self.ffw_layer_2 = ClippableLinear(4 * H, H, cfg.use_clipped_linears)
        self.pre_layer_norm = RMSNorm(H, NORM_EPS)
        self.post_layer_norm = RMSNorm(H, NORM_EPS)
        self.act = _ACTS[cfg.hidden_act]
        self.clip, self.scale = cfg.gradient_clipping, cfg.residual_weight

    def __call__(self, x):
        y = self.pre_layer_norm(_clamp(x, self.clip))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        y = self.post_layer_norm(_clamp(y, self.clip))
        return x + y * self.scale


class Attention(nn.Module):
    """Local causal attention with a relative-position term and a logit softcap, in fp32."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H, self.n_heads, self.head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.q_proj = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.k_proj = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.v_proj = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.post = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.relative_k_proj = Linear(H, H)
        self.per_dim_scale = mx.zeros((self.head_dim,))
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.cap, self.invalid = cfg.attention_logit_cap, cfg.attention_invalid_logits_value

    def __call__(self, x, pos: mx.array, offsets: tuple[int, ...], key_ok: mx.array):
        """pos: (W, H) sinusoids per offset (zero rows: no relative term); key_ok: (B, T, W)."""
        B, T, _ = x.shape
        nh, d, f32 = self.n_heads, self.head_dim, mx.float32
        q = self.q_proj(x).astype(f32).reshape(B, T, nh, d)
        k = self.k_proj(x).astype(f32).reshape(B, T, nh, d) * self.k_scale
        v = self.v_proj(x).astype(f32).reshape(B, T, nh, d)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale.astype(f32))
        rel = self.relative_k_proj(pos.astype(self.relative_k_proj.weight.dtype)).astype(f32)
        rel = rel.reshape(len(offsets), nh, d)
        lo, hi = max(offsets), max(0, -min(offsets))
        kp = mx.pad(k, [(0, 0), (lo, hi), (0, 0), (0, 0)])
        vp = mx.pad(v, [(0, 0), (lo, hi), (0, 0), (0, 0)])
        # band[:, t, j] = frame t - offsets[j]
        kb = mx.stack([kp[:, lo - o : lo - o + T] for o in offsets], axis=2)  # (B, T, W, nh, d)
        vb = mx.stack([vp[:, lo - o : lo - o + T] for o in offsets], axis=2)
        logits = (q[:, :, None] * (kb + rel)).sum(-1)  # q.k + q.r, (B, T, W, nh)
        logits = ops.softcap(logits, self.cap)
        logits = mx.where(key_ok[..., None], logits, self.invalid)
        p = mx.softmax(logits, axis=2, precise=True)
        out = (p[..., None] * vb).sum(2).reshape(B, T, nh * d)
        return self.post(out.astype(x.dtype))


class LightConv1d(nn.Module):
    """pre_norm -> linear (2H) -> GLU -> causal depthwise conv -> norm -> act -> linear, + x."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.linear_start = ClippableLinear(H, 2 * H, cfg.use_clipped_linears)
        self.linear_end = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.depthwise_conv1d = _DepthwiseWeight(H, cfg.conv_kernel_size)
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.act = _ACTS[cfg.hidden_act]
        self.clip = cfg.gradient_clipping

    def __call__(self, x):
        a, g = mx.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        y = self.depthwise_conv1d(a * ops.sigmoid(g))
        y = self.act(self.conv_norm(_clamp(y, self.clip)))
        return x + self.linear_end(y)


class _DepthwiseWeight(nn.Module):
    """Causal depthwise Conv1d, weight (C, K, 1) (MLX layout): y[t] = sum_k w[k] x[t - K + 1 + k]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, x):  # (B, T, C)
        K, T = self.weight.shape[1], x.shape[1]
        w = self.weight[:, :, 0].astype(x.dtype)
        xp = mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)])
        y = xp[:, 0:T] * w[:, 0]
        for k in range(1, K):
            y = y + xp[:, k : k + T] * w[:, k]
        return y


class ConformerLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.feed_forward1 = FeedForward(cfg)
        self.self_attn = Attention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.feed_forward2 = FeedForward(cfg)
        self.norm_pre_attn = RMSNorm(H, NORM_EPS)
        self.norm_post_attn = RMSNorm(H, NORM_EPS)
        self.norm_out = RMSNorm(H, NORM_EPS)
        self.clip = cfg.gradient_clipping

    def __call__(self, x, pos, offsets, key_ok):
        x = self.feed_forward1(x)
        y = self.self_attn(self.norm_pre_attn(_clamp(x, self.clip)), pos, offsets, key_ok)
        x = x + self.norm_post_attn(_clamp(y, self.clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clamp(x, self.clip))


class AudioEncoder(nn.Module):
    """`model.audio_tower`: features (B, T, mel) + mask (B, T) -> (B, ceil(T/4), output_proj_dims)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.subsample_conv_projection = SubsampleConvProjection(cfg)
        self.layers = [ConformerLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.output_proj_dims, bias=True)
        L, R = cfg.attention_context_left, cfg.attention_context_right
        # allowed offsets t - key: 0 .. L-2 to the past, 1 .. R-1 to the future
        self._offsets = tuple(range(-max(R - 1, 0), L - 1))
        P = (cfg.attention_chunk_size + L - 1 + R) // 2 + 1
        n = cfg.hidden_size // 2
        inv = np.exp(np.arange(n, dtype=np.float32) * np.float32(-math.log(1e4) / max(n - 1, 1)))
        rows = []
        for o in self._offsets:
            s = o + P - L  # transformers' relative position for offset o
            ang = np.float32(s) * inv
            rows.append(np.concatenate([np.sin(ang), np.cos(ang)]) if s >= 0 else np.zeros(2 * n, np.float32))
        self._pos = mx.array(np.stack(rows).astype(np.float32))

    def _key_ok(self, mask: mx.array) -> mx.array:
        B, T = mask.shape
        lo, hi = max(self._offsets), max(0, -min(self._offsets))
        mp = mx.pad(mask, [(0, 0), (lo, hi)])  # False beyond both ends
        return mx.stack([mp[:, lo - o : lo - o + T] for o in self._offsets], axis=2)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        mask = mask.astype(mx.bool_)
        x, mask = self.subsample_conv_projection(features, mask)
        key_ok = self._key_ok(mask)
        for layer in self.layers:
            x = layer(x, self._pos, self._offsets, key_ok)
        x = self.output_proj(x)
        return mx.where(mask[..., None], x, mx.zeros((), x.dtype)), mask  # padded frames -> 0


class AudioModel(nn.Module):
    """Audio tower plus embedder: what the text model needs for its audio placeholders."""

    def __init__(self, cfg: AudioConfig, text_hidden_size: int):
        super().__init__()
        self.config = cfg
        self.audio_tower = AudioEncoder(cfg)
        self.embed_audio = MultimodalEmbedder(cfg.output_proj_dims, text_hidden_size, cfg.rms_norm_eps)

    def __call__(self, features, mask) -> tuple[mx.array, mx.array]:
        """-> (embeddings (B, T/4, text_hidden), valid-token mask (B, T/4))."""
        h, m = self.audio_tower(mx.array(features), mx.array(mask))
        return self.embed_audio(h), m

    def soft_tokens(self, features, mask) -> mx.array:
        """Valid soft tokens of all clips in order, (sum of counts, text_hidden): the rows
        that replace the audio placeholders, clip after clip."""
        e, m = self(features, mask)
        idx = np.flatnonzero(np.array(m).reshape(-1))
        return e.reshape(-1, e.shape[-1])[mx.array(idx)]


_AUDIO_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("audio_tower.", "audio_tower."),
    ("model.embed_audio.", "embed_audio."),
    ("embed_audio.", "embed_audio."),
)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint tensors -> `AudioModel` parameters (docs/multimodal.md §6.2, §6.3); non-audio keys dropped.
    The key-mapper contract: `gemma4_mlx.checkpoint.keys` (no config: the mapping needs none).

    - `model.` prefix stripped; the `.linear.` nesting of clippable linears kept;
    - SSCP Conv2d (out, in, 3, 3) -> (out, 3, 3, in) and depthwise Conv1d (C, 1, K) ->
      (C, K, 1); tensors already in MLX layout (mlx-community) are detected by shape
      and left alone (the Conv2d test is ambiguous only for in_channels == 3, which no
      config has: in is 1 or subsampling_conv_channels[0]);
    - clamp scalars widened to fp32; `per_dim_scale` kept raw (softplus at run time).
    """
    out = {}
    for key, v in weights.items():
        for old, new in _AUDIO_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        else:
            continue
        if key.endswith((".inv_timescales", ".softcap")) or "embedding_pre_projection_norm" in key:
            continue  # non-persistent buffers / a norm without weight
        if key.endswith(".conv.weight") and v.ndim == 4 and not (v.shape[1] == v.shape[2] == 3):
            v = v.transpose(0, 2, 3, 1)
        elif key.endswith("depthwise_conv1d.weight") and v.ndim == 3 and v.shape[1] == 1:
            v = v.transpose(0, 2, 1)
        elif key.rpartition(".")[2] in CLAMPS:
            v = v.astype(mx.float32).reshape(())
        out[key] = v
    return out
