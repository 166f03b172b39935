"""gemma4-mlx: Gemma 4 on MLX.

    import gemma4_mlx
    model, tokenizer = gemma4_mlx.load("path/to/gemma-4-E2B-it")
    print(gemma4_mlx.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64))
"""

from ._blas import preload_openblas

preload_openblas()  # must run before anything imports mlx.core

from .loader import load, load_drafter, LoadError  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402
from .chat.session import Chat, Reply  # noqa: E402
from .speculative import speculative_batch_generate  # noqa: E402
from . import multimodal  # noqa: E402  (multimodal.Image / Audio / Video with per-item options)
from .multimodal import MediaError  # noqa: E402

__all__ = ["load", "load_drafter", "LoadError", "generate", "stream_generate", "Chat", "Reply",
           "speculative_batch_generate", "multimodal", "MediaError"]
__version__ = "0.1.0"
