"""The Gemma 4 text decoder (docs/text-decoder.md §4) as MLX modules.

Layout of parameters follows the transformers text-only checkpoint (`model.*`),
so `sanitize` only has to strip prefixes, drop unused tensors and split experts.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx import ops
from gemma4_mlx.cache import LayerCaches, build_mask
from gemma4_mlx.cache import quantized as kv_quant
from gemma4_mlx.config import (
    FULL,
    MEDIA_TOKEN_IDS,
    UNIFIED,
    AudioConfig,
    LayerSpec,
    ModelConfig,
    TextConfig,
    UnifiedAudioConfig,
    UnifiedVisionConfig,
    VisionConfig,
)
from gemma4_mlx.models import fuse, parallel
from gemma4_mlx.models.audio import AudioModel
from gemma4_mlx.models.layers import CLAMPS, Linear, RMSNorm
from gemma4_mlx.models.moe import Experts, Router
from gemma4_mlx.models.parallel import Plan, Shard
from gemma4_mlx.models.quantized import QEmbedding, table_dtype
from gemma4_mlx.models.rope import RoPE
from gemma4_mlx.models.unified import UnifiedAudio, UnifiedVision
from gemma4_mlx.models.vision import VisionModel


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, rope: RoPE):
        super().__init__()
        H, nh, d, kv = cfg.hidden_size, cfg.num_attention_heads, spec.head_dim, spec.kv_heads
        self.n_heads, self.n_kv, self.head_dim = nh, kv, d
        self.shared = spec.shared
        self.k_eq_v = spec.k_eq_v
        self.eps = cfg.rms_norm_eps
        self.q_proj = Linear(H, nh * d)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if not spec.shared:  # KV consumers have no K/V weights at runtime
            self.k_proj = Linear(H, kv * d)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            if not spec.k_eq_v:
                self.v_proj = Linear(H, kv * d)
        self.o_proj = Linear(nh * d, H)
        self.rope = rope
        self.tp: Shard | None = None  # set by `shard`: o_proj's product is then summed over ranks

    def shard(self, tp: Shard, what: str) -> Plan:
        """Keep this rank's query heads and the KV heads they read (docs/distributed.md §2)."""
        q, kv, self.n_heads, self.n_kv = parallel.head_slices(self.n_heads, self.n_kv, tp, what)
        self.tp = tp
        plan = {"q_proj": q, "o_proj": parallel.rows(tp)}
        if not self.shared:
            plan["k_proj"] = kv
            if not self.k_eq_v:
                plan["v_proj"] = kv
        return parallel.apply(self, plan)

    def fuse(self) -> None:
        """q/k/v as one product (`models/fuse.py`), after any `shard`."""
        if not self.shared:
            fuse.fuse(self, ("q_proj", "k_proj") if self.k_eq_v else ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def key_split(self) -> kv_quant.KeySplit | None:
        """How a quantized cache may keep this layer's keys: on a K = V layer only the
        dims RoPE rotates (the rest are k_norm's weight times V, docs/kv-cache.md §7)."""
        if self.shared or not self.k_eq_v:
            return None
        dims = self.rope.rotated_dims()
        return None if len(dims) == self.head_dim else kv_quant.KeySplit(dims, self.k_norm.weight, self.head_dim)

    def _project(self, x) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """Raw q, k, v (k and v None on KV consumers, v None on K = V layers)."""
        if "qkv_proj" in self:
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, *v = mx.split(self.qkv_proj(x), [nq] if self.k_eq_v else [nq, nq + nk], axis=-1)
            return q, k, v[0] if v else None
        if self.shared:
            return self.q_proj(x), None, None
        return self.q_proj(x), self.k_proj(x), None if self.k_eq_v else self.v_proj(x)

    def __call__(self, x, mask, offset, cache=None, shared_kv=None):
        B, T, _ = x.shape
        q, raw_k, raw_v = self._project(x)
        q = self.q_norm(q.reshape(B, T, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), offset)
        if self.shared:
            k, v = shared_kv
        else:
            raw = raw_k.reshape(B, T, self.n_kv, self.head_dim)
            v = raw if self.k_eq_v else raw_v.reshape(B, T, self.n_kv, self.head_dim)
            v = ops.rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)  # v_norm: no weight, no RoPE
            k = self.rope(self.k_norm(raw).transpose(0, 2, 1, 3), offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        out = kv_quant.attention(q, k, v, mask)  # quantized cache entries: docs/kv-cache.md §3
        out = self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))
        return parallel.all_sum(out, self.tp), (k, v)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)

    def shard(self, tp: Shard) -> Plan:
        """gate/up keep this rank's inner columns, down its input rows: the product is
        this rank's part of the sum, completed by the caller's `all_sum`."""
        plan = {"gate_proj": parallel.columns(tp), "up_proj": parallel.columns(tp), "down_proj": parallel.rows(tp)}
        return parallel.apply(self, plan)

    def fuse(self) -> None:
        """gate/up as one product (`models/fuse.py`), after any `shard`."""
        fuse.fuse(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def __call__(self, x):
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.geglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, rope: RoPE):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = Attention(cfg, spec, rope)
        self.mlp = MLP(H, spec.intermediate)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.layer_scalar = mx.ones((1,))  # learned; multiplies the whole stream
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(H, cfg.num_experts, cfg.top_k_experts, eps)
            self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)  # dense branch
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)  # expert branch
        self.ple = bool(cfg.hidden_size_per_layer_input)
        if self.ple:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = Linear(H, P)
            self.per_layer_projection = Linear(P, H)
            self.post_per_layer_input_norm = RMSNorm(H, eps)
        self.tp: Shard | None = None

    def shard(self, tp: Shard, mlp: bool = True) -> Plan:
        """Attention by heads; the MLP by columns (mlp=False: replicated, the drafter's);
        MoE experts by expert (docs/distributed.md §2-§3).  PLE projections stay whole."""
        what = f"layer {self.spec.index}"
        plan = {f"self_attn.{k}": v for k, v in self.self_attn.shard(tp, what).items()}
        if mlp:
            self.tp = tp
            plan.update({f"mlp.{k}": v for k, v in self.mlp.shard(tp).items()})
            if self.moe:
                plan.update({f"experts.{k}": v for k, v in self.experts.shard(tp).items()})
        return plan

    def fuse(self) -> None:
        """Stack the projections that share an input (`models/fuse.py`)."""
        self.self_attn.fuse()
        self.mlp.fuse()
        if self.moe:
            self.experts.fuse()

    def _feedforward(self, r):
        """The dense MLP, and beside it on MoE layers the experts: both partial sums
        on a sharded layer go through one `all_sum` (stacked), then the norms."""
        m = self.mlp(self.pre_feedforward_layernorm(r))
        if not self.moe:
            return parallel.all_sum(m, self.tp)
        w, idx = self.router(r)  # the router reads the un-normed stream
        e = self.experts(self.pre_feedforward_layernorm_2(r), w, idx)
        if self.tp is not None:
            m, e = parallel.all_sum(mx.stack([m, e]), self.tp)
        return self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)

    def __call__(self, x, mask, offset, cache=None, shared_kv=None, ple=None):
        a, kv = self.self_attn(self.input_layernorm(x), mask, offset, cache, shared_kv)
        r = x + self.post_attention_layernorm(a)
        m = self._feedforward(r)
        x = r + self.post_feedforward_layernorm(m)
        if self.ple:
            g = ops.geglu(self.per_layer_input_gate(x), ple)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar.astype(x.dtype), kv


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        ropes = {}
        for s in cfg.layers:
            key = (s.type, s.head_dim)
            if key not in ropes:
                ropes[key] = RoPE(s.head_dim, cfg.rope_for(s.type))
        self.layers = [DecoderLayer(cfg, s, ropes[(s.type, s.head_dim)]) for s in cfg.layers]
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.placeholder_ids: tuple[int, ...] = ()  # set for multimodal (`gemma4`) checkpoints
        P = cfg.hidden_size_per_layer_input
        if P:
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = Linear(H, L * P)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)
        self.tp: Shard | None = None
        self.first_token = 0  # sharded: the first vocabulary row this rank's table holds

    def shard(self, tp: Shard) -> Plan:
        """The tied table by vocabulary rows, every layer (docs/distributed.md §2); the
        PLE table and projections stay whole (small, or memory-mapped)."""
        V = self.cfg.vocab_size
        self.first_token = tp.rank * tp.split(V, "vocabulary")
        self.tp = tp
        plan = parallel.apply(self, {"embed_tokens": parallel.columns(tp)})
        for i, layer in enumerate(self.layers):
            plan.update({f"layers.{i}.{k}": v for k, v in layer.shard(tp).items()})
        return plan

    # -- embeddings ----------------------------------------------------------
    def embed(self, ids: mx.array) -> mx.array:
        # sqrt(H) is rounded to the weight dtype first, as the reference does.
        dt = table_dtype(self.embed_tokens)  # a quantized table stores uint32 codes
        return self._rows(ids) * mx.array(math.sqrt(self.cfg.hidden_size), dt)

    def _rows(self, ids: mx.array) -> mx.array:
        """Table rows of ids; sharded, each rank gives the rows it holds (zeros for the
        rest) and one `all_sum` completes them (adding zeros is exact)."""
        if self.tp is None:
            return self.embed_tokens(ids)
        local = ids - self.first_token
        hit = (local >= 0) & (local < self.cfg.vocab_size // self.tp.size)
        rows = self.embed_tokens(mx.where(hit, local, 0))
        return parallel.all_sum(mx.where(hit[..., None], rows, mx.zeros((), rows.dtype)), self.tp)

    def without_placeholders(self, ids: mx.array) -> mx.array:
        """Media placeholder ids read as the pad id, with or without media (as
        transformers' multimodal model does, also for a generated placeholder)."""
        hit = None
        for p in self.placeholder_ids:
            hit = (ids == p) if hit is None else hit | (ids == p)
        return mx.where(hit, self.cfg.pad_token_id, ids)

    def merge_media(self, ids: mx.array, media) -> tuple[mx.array, mx.array]:
        """Embeddings with soft tokens written into the placeholder rows (docs/multimodal.md §3.2).

        Returns (ids with placeholders -> pad, merged embeddings).  Soft tokens are
        not scaled by sqrt(H).  The PLE token part then reads the pad id at the
        placeholders and its context part the merged embeddings (docs/multimodal.md §3.2 step 4).
        """
        B, T = ids.shape
        if B != 1:
            raise ValueError(f"media prompts run one at a time, got a batch of {B}")
        is_media = np.zeros(T, dtype=bool)
        is_media[media.index] = True
        ids = mx.where(mx.array(is_media)[None], self.cfg.pad_token_id, ids)
        x = self.embed(ids)
        x[:, mx.array(media.index)] = media.rows.astype(x.dtype)[None]
        return ids, x

    def per_layer_inputs(self, ids: mx.array, x0: mx.array) -> mx.array:
        cfg = self.cfg
        P, L, H = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers, cfg.hidden_size
        B, T = ids.shape
        table = self.embed_tokens_per_layer
        tok = table(ids) * mx.array(math.sqrt(P), table_dtype(table))
        ctx = self.per_layer_model_projection(x0) * ops.const(H**-0.5, x0.dtype)
        ctx = self.per_layer_projection_norm(ctx.astype(x0.dtype).reshape(B, T, L, P))
        return ((ctx + tok.reshape(B, T, L, P)) * ops.const(2**-0.5, x0.dtype)).astype(x0.dtype)

    # -- forward -------------------------------------------------------------
    def __call__(
        self, ids: mx.array, cache=None, keep: int | None = None, input_embeddings: mx.array | None = None, media=None
    ) -> mx.array:
        """Hidden states after the final norm.

        keep: only the last `keep` positions are needed; from the first KV-shared
            layer on the stream is cut to them (exact: consumers write no cache).
        media: `MediaRows` of this slice (placeholder rows and image blocks).
        """
        x = self._forward(ids, cache, keep, input_embeddings, media, fill_only=False)
        if keep is not None and keep < x.shape[1]:
            x = x[:, x.shape[1] - keep :]
        return self.norm(x)

    def fill_cache(self, ids: mx.array, cache, media=None) -> None:
        """Only the cache writes of a prefill chunk whose outputs nobody reads: the
        consumer layers and the final norm are skipped."""
        self._forward(ids, cache, None, None, media, fill_only=True)

    def _forward(self, ids, cache, keep, x, media, fill_only: bool):
        """The layer stack; the un-normed stream, or None when fill_only."""
        cfg = self.cfg
        if self.placeholder_ids:
            ids = self.without_placeholders(ids)
        if media is not None:
            ids, x = self.merge_media(ids, media)
        elif x is None:
            x = self.embed(ids)
        ple = self.per_layer_inputs(ids, x) if cfg.hidden_size_per_layer_input else None
        if cache is None:
            cache = [None] * len(self.layers)
        masks, offsets = self._masks(cache, ids.shape[1], media)
        shared = {}
        for i, layer in enumerate(self.layers):
            s = layer.spec
            if i == cfg.first_shared:
                if fill_only:
                    return None
                if keep is not None and keep < x.shape[1]:
                    cut = x.shape[1] - keep
                    x = x[:, cut:]
                    ple = None if ple is None else ple[:, cut:]
                    masks = {t: m.last(keep) for t, m in masks.items()}
                    offsets = {t: o + cut for t, o in offsets.items()}
            kv_in = shared.get(s.producer) if s.shared else None
            x, kv = layer(x, masks[s.type], offsets[s.type], cache[i], kv_in, None if ple is None else ple[:, :, i])
            if not s.shared:
                shared[i] = kv
        return None if fill_only else x

    def _masks(self, cache, T: int, media) -> tuple[dict, dict]:
        """Per layer type: the mask and RoPE offset of T new tokens, read from the
        caches *before* any update."""
        cfg = self.cfg
        blocks = None
        if media is not None and cfg.use_bidirectional_attention == "vision":
            blocks = media.block_ids(T)  # 26B/31B: images bidirectional on sliding layers
        masks, offsets = {}, {}
        for i, s in enumerate(cfg.layers):
            if s.type in masks:
                continue
            window = cfg.sliding_window if s.type != FULL else None
            c = cache[i]
            if c is None:
                masks[s.type] = build_mask(0, 0, T, window, None)
                offsets[s.type] = 0
            else:
                masks[s.type] = c.mask(T)
                offsets[s.type] = c.positions()
            if blocks is not None and window is not None:
                masks[s.type] = masks[s.type].with_blocks(blocks)
        return masks, offsets


class Model(nn.Module):
    """Gemma 4 causal LM: `model(input_ids, cache=None) -> logits [B, T, vocab]`
    (a `contracts.DecodingModel`).

    With a vision / audio config it also owns the towers (`vision`, `audio`) that
    turn media into the soft-token rows `media=` carries into the decoder.
    """

    def __init__(
        self,
        cfg: TextConfig,
        vision: VisionConfig | None = None,
        audio: AudioConfig | None = None,
        media_ids: dict | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.media_ids = dict(media_ids or MEDIA_TOKEN_IDS)
        self.unified = False  # Gemma 4 12B: `vision` / `audio` are `models.unified` embedders
        self.tp: Shard | None = None
        if vision is not None:
            self.vision = VisionModel(vision, cfg.hidden_size)
        if audio is not None:
            self.audio = AudioModel(audio, cfg.hidden_size)

    @classmethod
    def from_config(cls, config: ModelConfig, text_only: bool = False) -> Model:
        """The model a config.json describes; text_only leaves the towers out."""
        raw = config.raw
        vision = audio = None
        if not text_only and raw.get("vision_config") and not config.unified:
            vision = VisionConfig.from_dict(raw["vision_config"])
        if not text_only and raw.get("audio_config") and not config.unified:
            audio = AudioConfig.from_dict(raw["audio_config"])
        model = cls(config.text, vision, audio, config.media_ids)
        if config.unified and not text_only:  # embedders in place of towers (docs/unified.md §3)
            H = config.text.hidden_size
            if raw.get("vision_config"):
                model.vision = UnifiedVision(UnifiedVisionConfig.from_dict(raw["vision_config"]), H)
            if raw.get("audio_config"):
                model.audio = UnifiedAudio(UnifiedAudioConfig.from_dict(raw["audio_config"]), H)
        if config.model_type in ("gemma4", UNIFIED):  # the multimodal wrappers, towers loaded or not
            ids = config.media_ids
            model.model.placeholder_ids = (ids["image"], ids["audio"], ids["video"])
        model.unified = config.unified
        return model

    def shard(self, tp: Shard | None) -> Plan:
        """Keep this rank's part of the text decoder (docs/distributed.md); the towers stay
        whole.  Returns module path -> `parallel.Slice`, what the loader reads per rank."""
        if tp is None:
            return {}
        self.tp = tp
        return {f"model.{k}": v for k, v in self.model.shard(tp).items()}

    @property
    def has_vision(self) -> bool:
        return "vision" in self

    @property
    def has_audio(self) -> bool:
        return "audio" in self

    # -- the `contracts.DecodingModel` interface -------------------------------
    def __call__(
        self, input_ids: mx.array, cache: LayerCaches | None = None, logits_to_keep: int | None = None, media=None
    ) -> mx.array:
        return self.logits(self.hidden(input_ids, cache, keep=logits_to_keep, media=media))

    def hidden(
        self, input_ids: mx.array, cache: LayerCaches | None = None, keep: int | None = None, media=None
    ) -> mx.array:
        """Final-norm hiddens [B, keep or T, H] (what an MTP drafter is seeded with)."""
        return self.model(input_ids, cache, keep=keep, media=media)

    def embed(self, input_ids: mx.array) -> mx.array:
        """The scaled token embedding (table * sqrt(H)), as the first layer reads it."""
        return self.model.embed(input_ids)

    def logits(self, h: mx.array) -> mx.array:
        emb = self.model.embed_tokens  # tied head
        out = emb.as_linear(h) if isinstance(emb, QEmbedding) else ops.linear(h, emb.weight)
        cap = self.config.final_logit_softcapping
        out = ops.softcap(out, cap) if cap else out.astype(mx.float32)
        return parallel.gather_vocab(out, self.tp)  # sharded: this rank's vocabulary columns

    def fill_cache(self, input_ids: mx.array, cache: LayerCaches, media=None) -> None:
        """Run a prefill chunk only for its cache writes (no logits computed)."""
        self.model.fill_cache(input_ids, cache, media=media)

    def make_cache(self, *, max_rollback: int = 32, left_pad=None, kv_bits: int | None = None) -> LayerCaches:
        """Empty caches; kv_bits 8 or 4 quantize every layer's K/V (docs/kv-cache.md)."""
        c = self.config
        return LayerCaches.for_layers(
            c.layer_types,
            c.first_shared,
            c.sliding_window,
            max_rollback=max_rollback,
            left_pad=left_pad,
            kv_bits=kv_bits,
            key_splits=self._key_splits() if kv_quant.check_bits(kv_bits) else None,
        )

    def _key_splits(self) -> dict:
        """Layer index -> how a quantized cache keeps a K = V layer's keys (§7 of docs/kv-cache.md)."""
        return {i: layer.self_attn.key_split() for i, layer in enumerate(self.layers)}

    def fuse(self) -> None:
        """Stack each layer's projections that share an input (`models/fuse.py`); the
        loader calls it once the weights (and a rank's shard) are in place."""
        for layer in self.layers:
            layer.fuse()

    @property
    def layers(self):
        return self.model.layers

    def num_parameters(self, towers: bool = False) -> int:
        """Learned parameters of the text model (layer_scalar and the towers' clamp
        scalars are buffers, as in the reference); towers=True adds the towers."""
        params = self.parameters() if towers else {"model": self.model.parameters()}
        return sum(v.size for k, v in tree_flatten(params) if not k.endswith(("layer_scalar",) + CLAMPS))
