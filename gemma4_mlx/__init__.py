"""gemma4-mlx: Gemma 4 on MLX.

    import gemma4_mlx
    model, tokenizer = gemma4_mlx.load("path/to/gemma-4-E2B-it")
    print(gemma4_mlx.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64))

docs/architecture.md maps the package: which folder holds which concept.
"""

from gemma4_mlx._blas import preload_openblas

preload_openblas()  # must run before anything imports mlx.core

import importlib  # noqa: E402
import pkgutil  # noqa: E402

# The public names, imported on first use (PEP 562): `import gemma4_mlx` stays light,
# so `gemma4-mlx --help` does not wait seconds for mlx-lm, transformers and torch.
_EXPORTS = {
    "load": "gemma4_mlx.api",
    "load_drafter": "gemma4_mlx.api",
    "LoadError": "gemma4_mlx.api",
    "CacheFileError": "gemma4_mlx.api",
    "generate": "gemma4_mlx.api",
    "stream_generate": "gemma4_mlx.api",
    "batch_generate": "gemma4_mlx.api",
    "speculative_batch_generate": "gemma4_mlx.api",
    "cache_prompt": "gemma4_mlx.api",
    "share_with_thread": "gemma4_mlx.api",
    "own_thread": "gemma4_mlx.api",
    "SamplingOptions": "gemma4_mlx.api",
    "encode_prompt": "gemma4_mlx.prompt.tokens",
    "Chat": "gemma4_mlx.chat.session",
    "Reply": "gemma4_mlx.chat.session",
    "Image": "gemma4_mlx.media.prepare",
    "Audio": "gemma4_mlx.media.prepare",
    "Video": "gemma4_mlx.media.prepare",
    "MediaError": "gemma4_mlx.media.prepare",
}


# public submodules only: `__main__` (the CLI) must not run on a `hasattr`
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str):
    if name == "multimodal":  # the earlier name of `media`
        return importlib.import_module("gemma4_mlx.media")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # `gemma4_mlx.media`, `.api`, ...: reachable, as an eager package made them
        return importlib.import_module(f"gemma4_mlx.{name}")
    raise AttributeError(f"module 'gemma4_mlx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "multimodal"])


__all__ = [*_EXPORTS, "multimodal"]
__version__ = "0.1.0"
