"""Gemma 4 MTP drafter ("assistant", model_type `gemma4_assistant`), docs/speculative.md §1-§6.

Four Gemma 4 decoder layers that compute queries only and attend to K/V the
*target* wrote (its last non-shared sliding and full layers).  One draft step:

    x0 = [E_t[token] * sqrt(D_t) ; h]          (target embedding first, hidden second)
    u  = layers(pre_projection(x0))            (all at one constant RoPE position)
    x  = norm(u)
    logits = head(x)                           (dense tied head, or the centroid head)
    h' = post_projection(x)                    (carried into the next step)

The drafter's own `embed_tokens` is only its tied LM head, never an input table.

One model, several names: the checkpoint calls it an *assistant* (model_type
`gemma4_assistant`, `AssistantConfig` here), our module is `Drafter`, the docs say *MTP
drafter* (multi-token prediction), and the public API takes it as a draft model
(`load_drafter`, `stream_generate(draft_model=...)`, `--draft-model`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx import ops
from gemma4_mlx.config import FULL, SLIDING, AssistantConfig, ConfigError, TextConfig
from gemma4_mlx.models.layers import Linear, RMSNorm
from gemma4_mlx.models.quantized import QEmbedding
from gemma4_mlx.models.rope import RoPE
from gemma4_mlx.models.text import DecoderLayer


def producer_layers(target: TextConfig) -> dict[str, int]:
    """Target layer whose K/V feeds each drafter layer type: the last non-shared
    layer of that type (docs/speculative.md §2)."""
    out = {}
    for s in target.layers[: target.first_shared]:
        out[s.type] = s.index
    return out


def check_pair(draft: AssistantConfig, target: TextConfig, source: str = "drafter") -> None:
    """One clear error if the drafter was not made for this target."""
    if draft.backbone_hidden_size != target.hidden_size:
        raise ConfigError(
            f"{source}: backbone_hidden_size {draft.backbone_hidden_size} != "
            f"target hidden_size {target.hidden_size} (drafter made for another model)"
        )
    if draft.text.vocab_size != target.vocab_size:
        raise ConfigError(f"{source}: vocab_size {draft.text.vocab_size} != target {target.vocab_size}")
    if draft.text.sliding_window != target.sliding_window:
        raise ConfigError(f"{source}: sliding_window {draft.text.sliding_window} != target {target.sliding_window}")
    prod = producer_layers(target)
    for s in draft.text.layers:
        if s.type not in prod:
            raise ConfigError(f"{source}: layer {s.index} ({s.type}): the target has no non-shared layer of that type")
        t = target.layers[prod[s.type]]
        if (s.head_dim, s.kv_heads) != (t.head_dim, t.kv_heads):
            raise ConfigError(
                f"{source}: layer {s.index} ({s.type}) expects {s.kv_heads} KV heads "
                f"of dim {s.head_dim}; target layer {t.index} has {t.kv_heads} x {t.head_dim}"
            )


class DrafterBody(nn.Module):
    """`model.*` of the checkpoint: tied head table, four query-only layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        ropes = {}
        for s in cfg.layers:
            if (s.type, s.head_dim) not in ropes:
                ropes[(s.type, s.head_dim)] = RoPE(s.head_dim, cfg.rope_for(s.type))
        self.layers = [DecoderLayer(cfg, s, ropes[(s.type, s.head_dim)]) for s in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CentroidHead(nn.Module):
    """`masked_embedding.*` (E2B/E4B drafters): score 2048 cluster centroids, keep
    the top 32, score only their 32 x 128 tokens (docs/speculative.md §5)."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        if vocab % num_centroids:
            raise ConfigError(f"vocab_size {vocab} is not divisible by num_centroids {num_centroids}")
        self.centroids = Linear(hidden, num_centroids)
        self.token_ordering = mx.zeros((vocab,), mx.int32)
        self.top_k = top_k
        self.per_cluster = vocab // num_centroids

    def candidates(self, x: mx.array, ordered: bool) -> tuple[mx.array, mx.array]:
        """(rows of the head table to read, their canonical token ids), both [..., top_k * n]."""
        scores = self.centroids(x)
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        slots = (top[..., None] * self.per_cluster + mx.arange(self.per_cluster)).reshape(*top.shape[:-1], -1)
        ids = self.token_ordering[slots]
        return (slots if ordered else ids), ids


class Drafter(nn.Module):
    """`Gemma4AssistantForCausalLM` for inference (a `contracts.MTPDrafter`)."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.model = DrafterBody(t)
        self.pre_projection = Linear(2 * cfg.backbone_hidden_size, t.hidden_size)
        self.post_projection = Linear(t.hidden_size, cfg.backbone_hidden_size)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(
                t.hidden_size, t.vocab_size, cfg.num_centroids, cfg.centroid_intermediate_top_k
            )
        # True once the loader stored head rows in token_ordering order (SGLang's
        # trick): the top clusters are then 32 contiguous blocks of the table.
        self.ordered = False

    def shard(self, tp) -> dict:
        """Follow a sharded target (docs/distributed.md §4): the drafter's queries read the
        target's caches, which hold only this rank's KV heads, so its attention keeps the
        matching query heads (o_proj summed over ranks); everything else stays whole."""
        if tp is None:
            return {}
        plan = {}
        for i, layer in enumerate(self.model.layers):
            plan.update({f"model.layers.{i}.{k}": v for k, v in layer.shard(tp, mlp=False).items()})
        return plan

    def fuse(self) -> None:
        """Stack the MLPs' gate/up (`models/fuse.py`; the layers' attention is queries only)."""
        for layer in self.model.layers:
            layer.fuse()

    @property
    def centroid_head(self) -> bool:
        return "masked_embedding" in self

    def step(self, x0: mx.array, kv: dict, masks: dict, offset) -> tuple[mx.array, mx.array]:
        """x0 [B, T, 2*D_t] -> (normed hidden [B, T, d], next carried hidden [B, T, D_t]).

        kv / masks: per layer type, the target's K/V [B, kv, S, hd] and a `cache.Mask`.
        offset: the RoPE position (int or per-row [B]), the same for every draft step.
        """
        u = self.pre_projection(x0)
        for layer in self.model.layers:
            t = layer.spec.type
            u, _ = layer(u, masks[t], offset, None, kv[t])
        x = self.model.norm(u)
        return x, self.post_projection(x)

    def _head_rows(self, rows: mx.array, x: mx.array) -> mx.array:
        """x [..., d] . head[rows] [..., n, d] -> [..., n]."""
        e = self.model.embed_tokens(rows).astype(x.dtype)
        return (e @ x[..., :, None])[..., 0]

    def argmax(self, x: mx.array) -> mx.array:
        """Greedy draft token ids [...] for normed hiddens x [..., d]; with the centroid
        head only the 4,096 candidates are scored (no vocabulary-wide tensor)."""
        if not self.centroid_head:
            return mx.argmax(self.dense_logits(x), axis=-1)
        rows, ids = self.masked_embedding.candidates(x, self.ordered)
        best = mx.argmax(self._head_rows(rows, x), axis=-1)
        return mx.take_along_axis(ids, best[..., None], axis=-1)[..., 0]

    def dense_logits(self, x: mx.array) -> mx.array:
        emb = self.model.embed_tokens
        if isinstance(emb, QEmbedding):
            return emb.as_linear(x)
        if self.ordered:
            raise RuntimeError("dense logits need the head in canonical order")
        return ops.linear(x, emb.weight)

    def logits(self, x: mx.array, fill: str = "-inf") -> mx.array:
        """Vocabulary-wide logits [..., V] (float32).  Centroid head: tokens outside
        the top clusters get -inf (a proper proposal for sampled drafts, docs/speculative.md §5),
        or with fill="hf" the reference's `min(selected) - 1` over the whole tensor."""
        if not self.centroid_head:
            return self.dense_logits(x).astype(mx.float32)
        rows, ids = self.masked_embedding.candidates(x, self.ordered)
        sel = self._head_rows(rows, x).astype(mx.float32)
        lead = sel.shape[:-1]
        value = mx.min(sel) - 1 if fill == "hf" else mx.array(-mx.inf, mx.float32)
        flat_sel, flat_ids = sel.reshape(-1, sel.shape[-1]), ids.reshape(-1, ids.shape[-1])
        out = mx.full((flat_sel.shape[0], self.config.text.vocab_size), value, mx.float32)
        out = mx.put_along_axis(out, flat_ids.astype(mx.int32), flat_sel, axis=-1)
        return out.reshape(*lead, -1)

    def num_parameters(self) -> int:
        return sum(
            v.size for k, v in tree_flatten(self.parameters()) if not k.endswith(("layer_scalar", "token_ordering"))
        )


__all__ = ["AssistantConfig", "Drafter", "producer_layers", "check_pair", "SLIDING", "FULL"]
