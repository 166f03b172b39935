"""`gemma4-mlx` command line.  Generated text goes to stdout; progress, statistics
and errors go to stderr, so the output composes in shell pipelines."""

from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Gemma 4 on MLX: generate text, convert checkpoints, chat.")


@app.callback()
def _root():
    """Gemma 4 on MLX."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder or Hugging Face repo id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; '-' or omitted reads stdin."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", min=0.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=1, help="Prompt tokens per prefill step."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 / bfloat16 / float16 (default: as stored)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No statistics on stderr."),
):
    """Generate a completion for one prompt, streamed to stdout."""
    from . import LoadError, load
    from .generate import stream_generate

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            fail("no --prompt given and nothing on stdin")
        prompt = sys.stdin.read()
    try:
        if not quiet:
            typer.echo(f"loading {model} ...", err=True)
        m, tokenizer = load(model, dtype=dtype)
    except LoadError as e:
        fail(str(e))
    if tokenizer is None:
        fail(f"{model}: no tokenizer files (tokenizer.json / tokenizer.model)")
    stats = None
    for chunk in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens, temperature=temp,
                                 top_p=top_p, top_k=top_k, min_p=min_p,
                                 repetition_penalty=repetition_penalty, seed=seed,
                                 chat=not raw, prefill_chunk=prefill_chunk):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats
    sys.stdout.write("\n")
    if stats is not None and not quiet:
        typer.echo(stats.line(), err=True)
