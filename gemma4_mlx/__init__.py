"""gemma4-mlx: Gemma 4 on MLX.

    import gemma4_mlx
    model, tokenizer = gemma4_mlx.load("path/to/gemma-4-E2B-it")
    print(gemma4_mlx.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64))

docs/architecture.md maps the package: which folder holds which concept.
"""

from gemma4_mlx._blas import preload_openblas

preload_openblas()  # must run before anything imports mlx.core

from gemma4_mlx import media as multimodal  # noqa: E402  (the earlier name of `media`)
from gemma4_mlx.api import (  # noqa: E402
    CacheFileError,
    LoadError,
    batch_generate,
    cache_prompt,
    generate,
    load,
    load_drafter,
    speculative_batch_generate,
    stream_generate,
)
from gemma4_mlx.chat.session import Chat, Reply  # noqa: E402
from gemma4_mlx.media.prepare import Audio, Image, MediaError, Video  # noqa: E402

__all__ = [
    "load",
    "load_drafter",
    "LoadError",
    "generate",
    "stream_generate",
    "batch_generate",
    "Chat",
    "Reply",
    "speculative_batch_generate",
    "cache_prompt",
    "CacheFileError",
    "Image",
    "Audio",
    "Video",
    "MediaError",
    "multimodal",
]
__version__ = "0.1.0"
