"""The `gemma4-mlx` app, its one-line errors and the options its commands share.

Commands import the package's heavy parts (MLX, transformers) inside their bodies,
so `gemma4-mlx --help` and option errors answer at once."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

# Plain (click) help: rich's renders every flag with a "<bool>" metavar.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Gemma 4 on MLX: generate text, convert checkpoints, chat.",
)


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"gemma4-mlx {of('gemma4-mlx')} (mlx {of('mlx')}, Python {sys.version.split()[0]})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    """Gemma 4 on MLX."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


DRAFT_MODEL_HELP = (
    "MTP drafter for speculative decoding (same output, faster): a folder or "
    "repo id; 'auto' (default) uses <model>-assistant if it is on this machine; "
    "'none' turns it off."
)
DRAFT_TOKENS_HELP = "Tokens drafted per round: a number (0 = off) or 'auto' (cost-aware)."
MODEL_HELP = (
    "Checkpoint folder, Hugging Face repo id, short name (e2b, e4b, 26b, 31b, their -it forms; demo) "
    "or a pulled model's name (gemma4-mlx list)."
)


def _check_draft_tokens(value: str) -> str:
    """--draft-tokens is checked while the command line is read, before a model loads."""
    from gemma4_mlx.speculative.policy import DraftPolicy

    try:
        DraftPolicy.for_setting(value)
    except ValueError as e:
        fail(f"--draft-tokens: {e}")
    return value


def load_draft(
    draft_model: str,
    draft_tokens: str,
    model: str,
    target,
    dtype,
    quiet: bool,
    repo: str | None = None,
    group=None,
):
    """(drafter or None, draft_tokens setting); errors end the command with one line.
    draft_tokens: already checked by the option's callback (`_check_draft_tokens`).
    repo: the hub id `model` was resolved from, also searched by 'auto'.
    group (--distributed): every rank must decide the same (a drafter found next to the
    model on one Mac only would make the ranks' rounds differ): one line otherwise."""
    drafter, k, path = _find_draft(draft_model, draft_tokens, model, target, dtype, quiet, repo)
    if group is not None:
        from gemma4_mlx import ranks
        from gemma4_mlx.checkpoint.files import fingerprint

        try:
            ranks.agree(f"{fingerprint(path) if drafter is not None else 'none'} K={k}", group, "draft model")
        except ranks.RankError as e:
            fail(str(e))
    return drafter, k


def _find_draft(draft_model, draft_tokens, model, target, dtype, quiet, repo):
    from gemma4_mlx.checkpoint.hub import find_drafter
    from gemma4_mlx.checkpoint.load import LoadError, load_drafter

    k = draft_tokens if draft_tokens == "auto" else int(draft_tokens)
    if draft_model == "none" or k == 0:
        return None, k, None
    if draft_model == "auto":
        path = find_drafter(model) or (find_drafter(repo) if repo else None)
    else:
        path = draft_model
    if path is None:
        if draft_tokens != "auto" and not quiet:
            typer.echo(
                f"note: --draft-tokens {k} ignored: no drafter found next to {model} (give --draft-model)", err=True
            )
        return None, k, None
    try:
        drafter = load_drafter(path, dtype=dtype, target=target)
    except LoadError as e:
        if draft_model == "auto":  # a found-but-unusable drafter must not stop generation
            typer.echo(f"note: not using drafter {path}: {e}", err=True)
            return None, k, None
        fail(f"--draft-model: {e}")  # not to be read as a problem of --model
    if not quiet:
        typer.echo(f"draft model: {path} (draft tokens: {k})", err=True)
    return drafter, k, Path(path)


def finite(value: float | None) -> float | None:
    """click's float ranges let `nan` and `inf` through (`--temp inf` is uniform noise,
    `--temp nan` NaN logits)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _check_seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value < 1 << 64:
        raise typer.BadParameter(f"{value} is not in 0 .. 2**64 - 1")
    return value


# Options shared by `generate` and `chat`, declared once.
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1)]
Temp = Annotated[float, typer.Option("--temp", min=0.0, help="0 = greedy.", callback=finite)]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, callback=finite)]
TopK = Annotated[int, typer.Option("--top-k", min=0)]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, callback=finite)]
Seed = Annotated[int | None, typer.Option("--seed", callback=_check_seed)]


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"{value!r} is not one of float32, bfloat16, float16")
    return value


def existing_files(value):
    """Files named on the command line (one or a list) must exist before minutes of
    loading a model (whether the model can take them is checked once it is loaded);
    given as `--opt=~/f` (the shell leaves that `~`), they are used expanded, as checked."""
    names = [value] if isinstance(value, str) else value or []
    expanded = [str(Path(name).expanduser()) for name in names]
    for name, path in zip(names, expanded):
        if not Path(path).is_file():
            raise typer.BadParameter(f"{name}: no such file")
    return expanded[0] if isinstance(value, str) else (expanded if value is not None else None)


Dtype = Annotated[
    str | None,
    typer.Option("--dtype", help="float32 / bfloat16 / float16 (default: as stored).", callback=_check_dtype),
]
DraftModel = Annotated[str, typer.Option("--draft-model", help=DRAFT_MODEL_HELP)]
DraftTokens = Annotated[str, typer.Option("--draft-tokens", help=DRAFT_TOKENS_HELP, callback=_check_draft_tokens)]


def _check_kv_bits(value: int) -> int:
    if value not in (16, 8, 4):
        raise typer.BadParameter(f"{value} is not one of 16, 8, 4")
    return value


KvBits = Annotated[
    int,
    typer.Option(
        "--kv-bits",
        help="KV cache width: 16 (the model's dtype), or 8 / 4 quantized for long contexts (docs/kv-cache.md).",
        callback=_check_kv_bits,
    ),
]
PromptCacheFile = Annotated[
    str | None,
    typer.Option(
        "--prompt-cache",
        help=(
            "A cache-prompt file made for this model and --kv-bits: the longest prefix it shares with "
            "the prompt is reused, only the rest is prefilled."
        ),
        callback=existing_files,
    ),
]
Images = Annotated[
    list[str] | None,
    typer.Option("--image", help="Image file for the prompt (repeatable).", callback=existing_files),
]
AudioFiles = Annotated[
    list[str] | None,
    typer.Option(
        "--audio",
        help="Audio file, up to 30 s: WAV, FLAC, MP3, M4A, Ogg (repeatable; E2B/E4B).",
        callback=existing_files,
    ),
]
Videos = Annotated[
    list[str] | None,
    typer.Option(
        "--video",
        help="Video file, up to 60 s; frames sampled as transformers does (repeatable).",
        callback=existing_files,
    ),
]
ImageBudget = Annotated[
    int | None,
    typer.Option(
        "--image-budget",
        help="Soft tokens per image / video frame: 70, 140, 280, 560 or 1120 (default: the checkpoint's).",
    ),
]
VideoAudio = Annotated[
    bool, typer.Option("--video-audio", help="Also give the videos' soundtracks to the audio tower (E2B/E4B).")
]
Force = Annotated[
    bool,
    typer.Option("--force", help="Load even if the weights need more memory than this machine can give."),
]
Distributed = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Split the model over the processes `mlx.launch` started (rank 0 does the I/O; docs/distributed.md).",
    ),
]
Backend = Annotated[
    str, typer.Option("--backend", help="With --distributed: any / ring / jaccl / mpi (as given to mlx.launch).")
]


def start_ranks(distributed: bool, backend: str = "any"):
    """The `mx.distributed` group for --distributed (None without it).  Ranks other
    than 0 write nothing to stdout: rank 0 alone shows the output."""
    if not distributed:
        return None
    from gemma4_mlx import ranks

    try:
        group = ranks.start(backend)
    except ranks.RankError as e:
        fail(str(e))
    if not ranks.is_leader(group):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    return group


def media_options(images, audio, videos, image_budget, video_audio: bool = False) -> dict:
    from gemma4_mlx.media.image import check_budget
    from gemma4_mlx.media.prepare import Video

    if image_budget is not None:
        try:
            check_budget(image_budget, "--image-budget")
        except ValueError as e:
            fail(str(e))
    return dict(
        images=list(images or []),
        audio=list(audio or []),
        videos=[Video(v, with_audio=video_audio) for v in videos or []],
        image_budget=image_budget,
    )


def require_text(text: str, media: dict) -> str:
    """The prompt, unless it is empty with no media to talk about (an empty stdin from
    a script or cron would otherwise be answered as if something had been asked)."""
    if not text.strip() and not any(media.get(k) for k in ("images", "audio", "videos")):
        fail("empty prompt: give --prompt TEXT or text on stdin")
    return text


def load_or_fail(model: str, dtype: str | None, tools: str | None = None, force: bool = False, group=None):
    """(model, tokenizer, tool functions); a bad checkpoint or tools file, or weights
    larger than the memory this machine can give (unless force), end the command with
    one line."""
    from gemma4_mlx.api import LoadError, load
    from gemma4_mlx.chat.tools import load_tools

    try:
        functions = load_tools(tools) if tools else []
        m, tokenizer = load(model, dtype=dtype, force=force, group=group)
    except (LoadError, ValueError) as e:
        fail(str(e))
    if tokenizer is None:
        fail(f"{model}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return m, tokenizer, functions


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            fail("no --prompt given and nothing on stdin")
        try:
            return sys.stdin.read()
        except UnicodeDecodeError as e:
            fail(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})")
    return prompt
