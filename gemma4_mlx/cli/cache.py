"""`cache-prompt`: prefill a prompt once and save its KV cache (docs/kv-cache.md §8),
for `generate --prompt-cache` / `chat --prompt-cache`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gemma4_mlx.cli.common import (
    AudioFiles,
    Dtype,
    Force,
    ImageBudget,
    Images,
    KvBits,
    Model,
    VideoAudio,
    Videos,
    app,
    fail,
    load_or_fail,
    media_options,
)


@app.command("cache-prompt")
def cache_prompt(
    out: Annotated[Path, typer.Argument(help="The cache file to write (safetensors).")],
    model: Model,
    prompt_file: Annotated[
        Path, typer.Option("--prompt-file", "-f", help="Text file holding the prompt ('-' reads stdin).")
    ],
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Encode as generate --raw does (no chat template); without it, as generate does."),
    ] = False,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", min=1, help="Prompt tokens per prefill step.")] = 512,
    max_rollback: Annotated[
        int,
        typer.Option(
            "--max-rollback",
            min=1,
            help=(
                "Tokens the sliding layers keep beyond their window: how far before the prompt's end a later "
                "prompt may diverge and still reuse the cache (more makes a larger file)."
            ),
        ),
    ] = 64,
    dtype: Dtype = None,
    force: Force = False,
    kv_bits: KvBits = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    image: Images = None,
    audio: AudioFiles = None,
    video: Videos = None,
    image_budget: ImageBudget = None,
    video_audio: VideoAudio = False,
):
    """Prefill a prompt and save the KV cache: `generate --prompt-cache OUT` with a
    prompt that starts the same way then prefills only what follows."""
    from gemma4_mlx.api import cache_prompt as save_cache

    media = media_options(image, audio, video, image_budget, video_audio)
    try:
        text = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompt-file {prompt_file}: {e}")
    if not quiet:
        typer.echo(f"loading {model} ...", err=True)
    m, tokenizer, _ = load_or_fail(model, dtype, force=force)
    t0 = time.perf_counter()
    try:
        n = save_cache(
            m,
            tokenizer,
            text,
            out,
            chat=not raw,
            kv_bits=kv_bits,
            prefill_chunk=prefill_chunk,
            max_rollback=max_rollback,
            **media,
        )
    except ValueError as e:  # CacheFileError (a write that failed), MediaError: one line
        fail(str(e))
    if not quiet:
        size = out.stat().st_size
        typer.echo(
            f"cached {n} tokens in {time.perf_counter() - t0:.1f} s: {out} ({size / 2**20:.2f} MiB, {kv_bits}-bit KV)",
            err=True,
        )
