"""What decoding and speculation need of a model, written down as protocols.

`runtime` (prefill, decode steps, the loops), `speculative` and `chat` use a
target model only through `DecodingModel` and a drafter only through
`MTPDrafter`; neither reaches into a model's submodules.  `models.text.Model`
and `models.assistant.Drafter` satisfy them.  The caches are `cache.LayerCaches`
of `cache.LayerCache`.

This module sits just above `cache` and `config`: models may import it, it
imports nothing from models, runtime, speculative, chat or api.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx

from gemma4_mlx.cache import LayerCache, LayerCaches, Mask
from gemma4_mlx.config import TextConfig


@runtime_checkable
class DecodingModel(Protocol):
    """A causal LM as the decoding loops and speculative decoding drive it.

    ids are [B, T] token ids; `media` the `MediaRows` of the placeholders in ids
    (one prompt); hiddens are the final-norm hidden states [B, T, H].
    """

    config: TextConfig

    def __call__(
        self, ids: mx.array, cache: LayerCaches | None = None, logits_to_keep: int | None = None, media=None
    ) -> mx.array:
        """Logits [B, T', V] (T' = logits_to_keep or T); writes ids into cache."""
        ...

    def make_cache(self, *, max_rollback: int = 32, left_pad=None, kv_bits: int | None = None) -> LayerCaches:
        """Empty caches; left_pad: per-row left padding of a batched prompt; kv_bits 8
        or 4: K/V stored quantized (docs/kv-cache.md), None or 16: the model's dtype."""
        ...

    def embed(self, ids: mx.array) -> mx.array:
        """The scaled token embedding [B, T, H] (table * sqrt(H)) — what an MTP
        drafter reads for its input token."""
        ...

    def hidden(self, ids: mx.array, cache: LayerCaches | None = None, keep: int | None = None, media=None) -> mx.array:
        """Final-norm hiddens [B, keep or T, H]; writes ids into cache."""
        ...

    def logits(self, h: mx.array) -> mx.array:
        """LM head (tied, softcapped) on hiddens: [..., H] -> [..., V] float32."""
        ...

    def fill_cache(self, ids: mx.array, cache: LayerCaches, media=None) -> None:
        """Write ids into cache only: a prefill chunk whose outputs nobody reads."""
        ...


@runtime_checkable
class MTPDrafter(Protocol):
    """A multi-token-prediction drafter that attends to its target's K/V."""

    config: object  # models.assistant.AssistantConfig

    def step(self, x0: mx.array, kv: dict, masks: dict[str, Mask], offset) -> tuple[mx.array, mx.array]:
        """x0 [B, T, 2 H_target] -> (normed hidden [B, T, d], carried hidden [B, T, H_target]);
        kv / masks per layer type (`LayerCache.draft_view` of the producer layers)."""
        ...

    def argmax(self, x: mx.array) -> mx.array:
        """Greedy draft token ids for normed hiddens x."""
        ...


__all__ = ["DecodingModel", "MTPDrafter", "LayerCache", "LayerCaches", "Mask"]
