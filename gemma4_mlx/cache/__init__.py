"""KV caches for Gemma 4 with exact rollback (`layer`), their masks (`mask`), a
model's caches as one object (`caches`), rows joining and leaving a running batch
(`rows`), prefix reuse across prompts (`prefix`) and caches saved to disk (`disk`)."""

from gemma4_mlx.cache.caches import LayerCaches
from gemma4_mlx.cache.layer import STEP, KVCache, LayerCache, SlidingKVCache
from gemma4_mlx.cache.mask import Mask, build_mask

__all__ = ["STEP", "KVCache", "LayerCache", "LayerCaches", "Mask", "SlidingKVCache", "build_mask"]
