"""`gemma4-mlx` command line.  Generated text goes to stdout; progress, statistics
and errors go to stderr, so the output composes in shell pipelines.

Commands import the package's heavy parts (MLX, transformers) inside their bodies,
so `gemma4-mlx --help` and option errors answer at once."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Gemma 4 on MLX: generate text, convert checkpoints, chat."
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


def load_draft(draft_model: str, draft_tokens: str, model: str, target, dtype, quiet: bool, repo: str | None = None):
    """(drafter or None, draft_tokens setting); errors end the command with one line.
    repo: the hub id `model` was resolved from, also searched by 'auto'."""
    from gemma4_mlx.checkpoint.hub import find_drafter
    from gemma4_mlx.checkpoint.load import LoadError, load_drafter
    from gemma4_mlx.speculative.policy import DraftPolicy

    try:
        DraftPolicy.for_setting(draft_tokens)
    except ValueError as e:
        fail(f"--draft-tokens: {e}")
    k = draft_tokens if draft_tokens == "auto" else int(draft_tokens)
    if draft_model == "none" or k == 0:
        return None, k
    if draft_model == "auto":
        path = find_drafter(model) or (find_drafter(repo) if repo else None)
    else:
        path = draft_model
    if path is None:
        if draft_tokens != "auto" and not quiet:
            typer.echo(
                f"note: --draft-tokens {k} ignored: no drafter found next to {model} (give --draft-model)", err=True
            )
        return None, k
    try:
        drafter = load_drafter(path, dtype=dtype, target=target)
    except LoadError as e:
        if draft_model == "auto":  # a found-but-unusable drafter must not stop generation
            typer.echo(f"note: not using drafter {path}: {e}", err=True)
            return None, k
        fail(str(e))
    if not quiet:
        typer.echo(f"draft model: {path} (draft tokens: {k})", err=True)
    return drafter, k


# Options shared by `generate` and `chat`, declared once.
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1)]
Temp = Annotated[float, typer.Option("--temp", min=0.0, help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
TopK = Annotated[int, typer.Option("--top-k", min=0)]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)]
Seed = Annotated[int | None, typer.Option("--seed")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="float32 / bfloat16 / float16 (default: as stored).")]
DraftModel = Annotated[str, typer.Option("--draft-model", help=DRAFT_MODEL_HELP)]
DraftTokens = Annotated[str, typer.Option("--draft-tokens", help=DRAFT_TOKENS_HELP, callback=_check_draft_tokens)]
Images = Annotated[list[str] | None, typer.Option("--image", help="Image file for the prompt (repeatable).")]
AudioFiles = Annotated[
    list[str] | None,
    typer.Option("--audio", help="Audio file, up to 30 s: WAV, FLAC, MP3, M4A, Ogg (repeatable; E2B/E4B)."),
]
Videos = Annotated[
    list[str] | None,
    typer.Option("--video", help="Video file, up to 60 s; frames sampled as transformers does (repeatable)."),
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


def _media(images, audio, videos, image_budget, video_audio: bool = False) -> dict:
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


def _load(model: str, dtype: str | None, tools: str | None = None):
    """(model, tokenizer, tool functions); a bad checkpoint or tools file ends the
    command with one line."""
    from gemma4_mlx.api import LoadError, load
    from gemma4_mlx.chat.tools import load_tools

    try:
        functions = load_tools(tools) if tools else []
        m, tokenizer = load(model, dtype=dtype)
    except (LoadError, ValueError) as e:
        fail(str(e))
    if tokenizer is None:
        fail(f"{model}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return m, tokenizer, functions


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            fail("no --prompt given and nothing on stdin")
        return sys.stdin.read()
    return prompt


@app.command()
def generate(
    model: Model,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Prompt text; '-' or omitted reads stdin.")
    ] = None,
    max_tokens: MaxTokens = 256,
    temp: Temp = 0.0,
    top_p: TopP = 0.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty", min=0.0)] = None,
    seed: Seed = None,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", min=1, help="Prompt tokens per prefill step.")] = 512,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help=(
                "Raw completion: no chat template, and control strings in the prompt (<|turn>, <|image|>, ...) "
                "are read as control tokens. Without --raw the prompt is user text: they stay text."
            ),
        ),
    ] = False,
    dtype: Dtype = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No statistics on stderr.")] = False,
    draft_model: DraftModel = "auto",
    draft_tokens: DraftTokens = "auto",
    image: Images = None,
    audio: AudioFiles = None,
    video: Videos = None,
    image_budget: ImageBudget = None,
    video_audio: VideoAudio = False,
):
    """Generate a completion for one prompt, streamed to stdout."""
    from gemma4_mlx.api import stream_generate
    from gemma4_mlx.media.prepare import MediaError

    media = _media(image, audio, video, image_budget, video_audio)
    prompt = _read_prompt(prompt)
    if not quiet:
        typer.echo(f"loading {model} ...", err=True)
    m, tokenizer, _ = _load(model, dtype)
    drafter, k = load_draft(draft_model, draft_tokens, model, m, dtype, quiet)
    stats = None
    try:
        for chunk in stream_generate(
            m,
            tokenizer,
            prompt,
            max_tokens=max_tokens,
            temperature=temp,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            chat=not raw,
            prefill_chunk=prefill_chunk,
            draft_model=drafter,
            draft_tokens=k,
            **media,
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            stats = chunk.stats
    except MediaError as e:
        fail(str(e))
    sys.stdout.write("\n")
    if stats is not None and not quiet:
        typer.echo(stats.line(), err=True)


@app.command()
def chat(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=(
                "Checkpoint folder or HF repo id (default: a cached/reachable Gemma 4 E2B-it, "
                "else the embedded demo model)."
            ),
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode (default off).")] = False,
    thinking_budget: Annotated[
        int | None,
        typer.Option("--thinking-budget", min=1, help="Characters of thought before the model is made to answer."),
    ] = None,
    tools: Annotated[
        str | None, typer.Option("--tools", help="Python file whose public functions become tools.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Run tool calls without asking.")] = False,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="One non-interactive turn ('-' = stdin).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --prompt/stdin: print the reply as JSON.")] = False,
    max_tokens: MaxTokens = 1024,
    temp: Temp = 0.0,
    top_p: TopP = 0.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    dtype: Dtype = None,
    draft_model: DraftModel = "auto",
    draft_tokens: DraftTokens = "auto",
    image: Images = None,
    audio: AudioFiles = None,
    video: Videos = None,
    image_budget: ImageBudget = None,
    video_audio: VideoAudio = False,
):
    """Chat with a Gemma 4 model in the terminal (multi-turn, thinking, tools, images,
    audio, video; /image PATH etc. attach media to the next message).  Media given
    here are sent with the first turn."""
    from rich.console import Console

    from gemma4_mlx.chat.session import Chat
    from gemma4_mlx.chat.terminal import Terminal, check_media, one_shot
    from gemma4_mlx.demo import DEFAULT_REPO, default_model
    from gemma4_mlx.runtime.generate import SamplingOptions

    media = _media(image, audio, video, image_budget, video_audio)
    repo = None
    if model is None:
        model, banner = default_model()
        repo = DEFAULT_REPO  # a cached snapshot path: its drafter is found by repo id
    else:
        banner = f"model: {model}"
    Console(stderr=True).print(banner, style="dim", markup=False)
    m, tokenizer, functions = _load(model, dtype, tools)
    drafter, k = load_draft(draft_model, draft_tokens, model, m, dtype, quiet=False, repo=repo)
    session = Chat(
        m,
        tokenizer,
        system=system,
        thinking=think,
        tools=functions,
        max_tokens=max_tokens,
        options=SamplingOptions(temp, top_p, top_k, min_p, seed=seed),
        thinking_budget=thinking_budget,
        drafter=drafter,
        draft_tokens=k,
    )
    try:
        check_media(session, media)  # a missing file or tower: said now, before any turn
    except ValueError as e:
        fail(str(e))
    if prompt is not None or not sys.stdin.isatty():
        text = sys.stdin.read() if prompt in (None, "-") else prompt
        try:
            raise typer.Exit(one_shot(session, text, as_json=as_json, assume_yes=yes, media=media))
        except ValueError as e:  # MediaError and other bad input: one line
            fail(str(e))
    console = Console()
    console.print("type /help for commands", style="dim")
    term = Terminal(session, console, assume_yes=yes)
    term.attach(media)
    term.loop()


@app.command()
def convert(
    src: str = typer.Argument(..., help="HF Gemma 4 checkpoint folder, or a Hugging Face repo id."),
    dst: str = typer.Argument(..., help="Output folder (written as DST.partial, renamed at the end)."),
    quant: str = typer.Option(..., "--quant", "-q", help="bf16, fp16, q8, q4, mxfp4, nvfp4, q4_0 or sfp8."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    keep_high_precision: bool = typer.Option(
        True,
        "--keep-high-precision/--no-keep-high-precision",
        help="Keep the PLE table and projections and the MoE router unquantized and the "
        "token embedding at 8 bits (default); --no-... puts them on the recipe too.",
    ),
):
    """Convert a Hugging Face Gemma 4 checkpoint (text model with its vision/audio towers, or an
    MTP drafter) to an MLX folder."""
    import time

    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.convert import ConvertError
    from gemma4_mlx.convert import convert as run

    t0 = time.perf_counter()
    try:
        report = run(
            src, dst, quant, force=force, keep_high_precision=keep_high_precision, progress=sys.stderr.isatty()
        )
    except (ConvertError, LoadError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"{dst}: interrupted; nothing was written")
    quantized = sum(1 for e in report.tensors.values() if e.get("format") != "float")
    kept = len(report.tensors) - quantized
    typer.echo(
        f"wrote {report.dst} ({quant}): {report.bytes_out / 2**20:.1f} MiB from "
        f"{report.bytes_in / 2**20:.1f} MiB, {quantized} quantized / {kept} high-precision "
        f"matrices, {time.perf_counter() - t0:.1f} s",
        err=True,
    )
    frac = report.lattice_fraction()
    if frac is not None:
        typer.echo(f"q4_0: {frac:.2%} of blocks on the QAT lattice (mean over tensors)", err=True)
    if getattr(report, "converted", None):
        typer.echo(f"converted: {', '.join(report.converted)}", err=True)
    if getattr(report, "processor_config", None):
        typer.echo(f"processor_config.json: {report.processor_config}", err=True)
    if report.skipped.get("skipped"):
        typer.echo(f"note: {report.skipped['skipped']} tensors without a module here were not converted", err=True)


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    no_load: bool = typer.Option(False, "--no-load", help="Headers only: skip the resident-memory measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Parameters, bytes and formats per component, and resident memory after loading."""
    import json

    from rich.console import Console

    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.checkpoint.hub import resolve_path
    from gemma4_mlx.checkpoint.info import model_info, render

    try:
        result = model_info(resolve_path(model), load=not no_load)
    except LoadError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render(result, Console())


# -- model management: pull, list, rm -----------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@app.command()
def pull(
    model: Annotated[
        str, typer.Argument(help="Repo id (google/gemma-4-E2B-it) or short name (e2b, e4b, 26b, 31b, -it forms).")
    ],
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            "-q",
            help="Also convert to an MLX folder in the models folder: bf16, fp16, q8, q4, mxfp4, nvfp4, q4_0 or sfp8.",
        ),
    ] = None,
    drafter: Annotated[
        bool, typer.Option("--drafter", help="Also pull the model's MTP drafter (<repo>-assistant): faster replies.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Convert again when the converted folder exists.")] = False,
):
    """Download a model from the Hugging Face Hub into its cache, and with --quant convert it
    (to $GEMMA4_MLX_MODELS, default ~/.local/share/gemma4-mlx/models).  Prints the name
    to give --model."""
    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.checkpoint.hub import REPO_ID, SHORT_NAMES, models_dir, repo_of
    from gemma4_mlx.checkpoint.store import converted_name, download, record_pull, short_name
    from gemma4_mlx.convert import ConvertError
    from gemma4_mlx.convert import convert as run
    from gemma4_mlx.convert.policy import RECIPES

    repo = repo_of(model) or model
    if not REPO_ID.fullmatch(repo):
        fail(f"{model}: not a repo id (owner/name) or a short name ({', '.join(SHORT_NAMES)})")
    if quant is not None and quant not in RECIPES:
        fail(f"--quant {quant}: expected one of {', '.join(RECIPES)}")
    name = short_name(repo)
    for r in [repo] + ([f"{repo}-assistant"] if drafter else []):
        typer.echo(f"pulling {r} ...", err=True)
        try:
            folder = download(r)
        except LoadError as e:
            fail(str(e))
        if quant is None:
            continue
        dst = models_dir() / converted_name(r, quant)
        if r == repo:
            name = dst.name
        if dst.exists() and not force:
            typer.echo(f"{dst.name}: converted already ({dst}; --force converts again)", err=True)
            continue
        typer.echo(f"converting {r} to {quant} ...", err=True)
        try:
            run(folder, dst, quant, force=force, progress=sys.stderr.isatty())
        except (ConvertError, LoadError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail(f"{dst}: interrupted; nothing was written")
        record_pull(dst, r, folder.name, quant)
        typer.echo(f"wrote {dst}", err=True)
    if quant is not None:
        typer.echo(f"the original stays in the Hugging Face cache: gemma4-mlx rm {short_name(repo)} frees it", err=True)
    typer.echo(f"ready: gemma4-mlx chat -m {name}", err=True)
    typer.echo(name)


@app.command("list")
def list_models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Models on this machine: pulled (converted) ones, Gemma 4 repos in the Hugging Face
    cache, and the embedded demo.  NAME is what --model accepts; RESIDENT estimates the
    weights a text chat keeps in memory (image/audio towers load on first use, the E2B/E4B
    per-layer table stays memory-mapped; the KV cache comes on top)."""
    import json

    from gemma4_mlx.checkpoint.store import list_models

    models = list_models()
    if as_json:
        typer.echo(json.dumps([m.as_dict() for m in models], indent=2))
        return
    rows = [("NAME", "FORMAT", "SIZE", "RESIDENT", "DRAFTER", "SOURCE")]
    for m in models:
        drafter = "(is a drafter)" if m.drafter_of else (m.drafter or "-")
        rows.append((m.name, m.format, _size(m.size_bytes), _size(m.resident_bytes), drafter, m.source or m.kind))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    if all(m.kind == "embedded" for m in models):
        typer.echo("no models pulled yet: gemma4-mlx pull e2b-it", err=True)


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="A NAME from gemma4-mlx list (pulled model, short name or repo id).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
):
    """Delete a pulled model, or a repo's entry in the Hugging Face cache (all its revisions)."""
    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.checkpoint.store import removal

    try:
        plan = removal(name)
    except LoadError as e:
        fail(str(e))
    if not yes:  # asked on stderr: stdout stays clean for pipelines
        typer.echo(f"remove {plan.what}, {_size(plan.size_bytes)}? [y/N] ", err=True, nl=False)
        answer = sys.stdin.readline()  # "" at end of input: no
        if not sys.stdin.isatty():
            typer.echo(err=True)  # a piped answer is not echoed: end the prompt's line
        if answer.strip().lower() not in ("y", "yes"):
            fail(f"{name}: not removed")
    plan.run()
    typer.echo(f"removed {plan.what}: {_size(plan.size_bytes)} freed", err=True)


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=MODEL_HELP + " Default: as `chat` (E2B-it when available, else demo)."),
    ] = None,
    draft_model: DraftModel = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require this key (Authorization: Bearer / x-api-key).")
    ] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting or running before 429.")] = 64,
    max_context: Annotated[
        int | None, typer.Option("--max-context", min=1, help="Longest prompt in tokens (default: the model's).")
    ] = None,
    allow_local_files: Annotated[
        bool, typer.Option("--allow-local-files", help="Let image parts name files on this machine.")
    ] = False,
    dtype: Dtype = None,
):
    """Serve the model over HTTP: OpenAI (/v1/chat/completions, /v1/completions) and
    Anthropic (/v1/messages) APIs, /health, /v1/models, /metrics."""
    import uvicorn

    from gemma4_mlx.demo import DEFAULT_REPO, DEFAULT_SHORT, DEMO_MODEL, default_model
    from gemma4_mlx.server import app as server_app

    repo, name = None, model
    if model is None:
        model, banner = default_model()
        repo, name = DEFAULT_REPO, "demo" if model == str(DEMO_MODEL) else DEFAULT_SHORT
        typer.echo(banner, err=True)
    m, tokenizer, _ = _load(model, dtype)
    drafter, _ = load_draft(draft_model, "auto", model, m, dtype, quiet=False, repo=repo)
    api = server_app(
        m,
        tokenizer,
        model_name=name,
        drafter=drafter,
        api_key=api_key,
        max_queue=max_queue,
        max_context=max_context,
        allow_local_files=allow_local_files,
    )
    typer.echo(f"serving {name!r} on http://{host}:{port}/v1", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info")
