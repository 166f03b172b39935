"""`generate` and `chat`."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from gemma4_mlx.cli.common import (
    AudioFiles,
    Backend,
    Distributed,
    DraftModel,
    DraftTokens,
    Dtype,
    Force,
    ImageBudget,
    Images,
    KvBits,
    MaxTokens,
    MinP,
    Model,
    PromptCacheFile,
    Seed,
    Temp,
    TopK,
    TopP,
    VideoAudio,
    Videos,
    app,
    existing_files,
    fail,
    finite,
    load_draft,
    load_or_fail,
    media_options,
    read_prompt,
    require_text,
    start_ranks,
)

JsonSchemaFile = Annotated[
    Path | None,
    typer.Option(
        "--json-schema", help="JSON schema file: the answer is JSON valid under it (docs/structured-output.md)."
    ),
]
Regex = Annotated[str | None, typer.Option("--regex", help="The answer fully matches this regular expression.")]


def output_constraint(schema_file: Path | None, pattern: str | None):
    """The `Grammar` of --json-schema / --regex (None: free); bad input: one line, exit 1."""
    from gemma4_mlx.constrain import ConstraintError, json_schema, regex

    if schema_file is not None and pattern is not None:
        fail("give --json-schema or --regex, not both")
    try:
        if pattern is not None:
            return regex(pattern, what="--regex")
        if schema_file is None:
            return None
        try:
            schema = json.loads(schema_file.read_text())
        except (OSError, ValueError) as e:
            fail(f"--json-schema {schema_file}: {e}")
        return json_schema(schema, what=f"--json-schema {schema_file}")
    except ConstraintError as e:
        fail(str(e))


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
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty", min=0.0, callback=finite)] = None,
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
    force: Force = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No statistics on stderr.")] = False,
    draft_model: DraftModel = "auto",
    draft_tokens: DraftTokens = "auto",
    image: Images = None,
    audio: AudioFiles = None,
    video: Videos = None,
    image_budget: ImageBudget = None,
    video_audio: VideoAudio = False,
    json_schema: JsonSchemaFile = None,
    regex: Regex = None,
    kv_bits: KvBits = 16,
    prompt_cache: PromptCacheFile = None,
    distributed: Distributed = False,
    backend: Backend = "any",
):
    """Generate a completion for one prompt, streamed to stdout."""
    from gemma4_mlx.api import CacheFileError, stream_generate
    from gemma4_mlx.media.prepare import MediaError

    media = media_options(image, audio, video, image_budget, video_audio)
    constraint = output_constraint(json_schema, regex)
    group = start_ranks(distributed, backend)
    if group is not None and prompt_cache is not None:
        fail("--prompt-cache: not with --distributed (a saved cache holds one process's whole KV heads)")
    if group is not None:  # rank 0 reads the prompt (stdin too) and passes it on
        from gemma4_mlx import ranks

        prompt = ranks.broadcast_text(read_prompt(prompt) if ranks.is_leader(group) else None, group)
        quiet = quiet or not ranks.is_leader(group)
    else:
        prompt = read_prompt(prompt)
    require_text(prompt, media)
    if not quiet:
        typer.echo(f"loading {model} ...", err=True)
    m, tokenizer, _ = load_or_fail(model, dtype, force=force, group=group)
    drafter, k = load_draft(draft_model, draft_tokens, model, m, dtype, quiet, group=group)
    stats = finish = None
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
            grammar=constraint,
            kv_bits=kv_bits,
            prompt_cache=prompt_cache,
            **media,
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            stats, finish = chunk.stats, chunk.finish_reason
    except (MediaError, CacheFileError, ValueError) as e:  # ValueError: bad input, a grammar the engine gave up on
        fail(str(e))
    sys.stdout.write("\n")
    if stats is not None and not quiet:
        typer.echo(stats.line(), err=True)
    if finish == "length" and constraint is not None:  # cut text is not an answer the schema / regex accepts
        what = "--json-schema" if json_schema else "--regex"
        fail(f"the output reached --max-tokens {max_tokens} before it was complete under {what}")
    if finish == "length" and not quiet:
        typer.echo(f"(stopped at --max-tokens {max_tokens})", err=True)


@app.command()
def chat(
    ctx: typer.Context,
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
    think: Annotated[
        bool | None, typer.Option("--think/--no-think", help="Thinking mode (default off, or as --resume saved it).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Go on with a chat saved by /save FILE.", callback=existing_files),
    ] = None,
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
    force: Force = False,
    draft_model: DraftModel = "auto",
    draft_tokens: DraftTokens = "auto",
    image: Images = None,
    audio: AudioFiles = None,
    video: Videos = None,
    image_budget: ImageBudget = None,
    video_audio: VideoAudio = False,
    json_schema: JsonSchemaFile = None,
    regex: Regex = None,
    strict_tools: Annotated[
        bool, typer.Option("--strict-tools", help="Tool calls name declared tools only, arguments per their schemas.")
    ] = False,
    kv_bits: KvBits = 16,
    prompt_cache: PromptCacheFile = None,
    rollback_slack: Annotated[
        str,
        typer.Option(
            "--rollback-slack",
            help="Tokens each sliding layer keeps for exact rollback (2048), or a memory budget for them (256MB).",
        ),
    ] = "2048",
    distributed: Distributed = False,
    backend: Backend = "any",
):
    """Chat with a Gemma 4 model in the terminal (multi-turn, thinking, tools, images,
    audio, video; /image PATH etc. attach media to the next message).  Media given
    here are sent with the first turn."""
    from rich.console import Console

    from gemma4_mlx.chat.mirror import FollowerChat, LeaderChat
    from gemma4_mlx.chat.session import Chat
    from gemma4_mlx.demo import DEFAULT_REPO, default_model
    from gemma4_mlx.runtime.generate import SamplingOptions

    media = media_options(image, audio, video, image_budget, video_audio)
    constraint = output_constraint(json_schema, regex)
    repo = None
    if model is None:
        model, banner = default_model()
        repo = DEFAULT_REPO  # a cached snapshot path: its drafter is found by repo id
    else:
        banner = f"model: {model}"
    group = start_ranks(distributed, backend)
    leader = group is None or group.rank() == 0
    if group is not None and prompt_cache is not None:
        fail("--prompt-cache: not with --distributed (a saved cache holds one process's whole KV heads)")
    if leader:
        Console(stderr=True).print(banner, style="dim", markup=False, soft_wrap=True)  # a log keeps whole lines
    m, tokenizer, functions = load_or_fail(model, dtype, tools, force=force, group=group)
    drafter, k = load_draft(draft_model, draft_tokens, model, m, dtype, quiet=not leader, repo=repo, group=group)
    session_type, extra = (Chat, {}) if group is None else (LeaderChat if leader else FollowerChat, {"group": group})
    slack = int(rollback_slack) if rollback_slack.isdigit() else rollback_slack
    if resume is not None and group is not None:
        fail("--resume: not with --distributed yet")
    try:
        fresh = partial(session_type, system=system, thinking=bool(think))
        session = (_resumed(resume, system, think, _left_unset(ctx)) if resume else fresh)(
            m,
            tokenizer,
            tools=functions,
            max_tokens=max_tokens,
            options=SamplingOptions(temp, top_p, top_k, min_p, seed=seed),
            thinking_budget=thinking_budget,
            drafter=drafter,
            draft_tokens=k,
            strict_tools=strict_tools,
            response_format=constraint,
            kv_bits=kv_bits,
            max_rollback=slack,
            **extra,
        )
    except ValueError as e:  # a malformed --rollback-slack; a saved chat that cannot go on here
        fail(str(e))
    if not leader:
        session.follow()  # does what rank 0's session does, until rank 0 says "exit"
        return
    try:
        _converse(session, media, prompt, prompt_cache, as_json, yes)
    finally:
        if group is not None:
            session.finish()


def _left_unset(ctx) -> set[str]:
    """Chat's keywords whose options this command line left at their defaults: a
    resumed chat keeps its saved cache width and slack for those."""
    options = {"kv_bits": "kv_bits", "max_rollback": "rollback_slack"}
    return {kw for kw, name in options.items() if ctx.get_parameter_source(name).name in ("DEFAULT", "DEFAULT_MAP")}


def _resumed(path: str, system: str | None, think: bool | None, unset: set[str]):
    """`Chat.load` of a saved chat, with the system prompt, thinking, cache width and
    slack it was saved with unless given again."""
    from gemma4_mlx.chat.session import Chat

    given = {k: v for k, v in (("system", system), ("thinking", think)) if v is not None}

    def load(model, tokenizer, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in unset}
        chat = Chat.load(path, model, tokenizer, **kwargs, **given)
        typer.echo(f"resumed {path}: {len(chat.messages)} messages", err=True)
        return chat

    return load


def _converse(session, media: dict, prompt: str | None, prompt_cache: str | None, as_json: bool, yes: bool) -> None:
    """The chat command's session, once loaded: one turn (--prompt / stdin) or the terminal."""
    from rich.console import Console

    from gemma4_mlx.chat.terminal import Terminal, check_media, one_shot

    try:
        check_media(session, media)  # a missing file or tower: said now, before any turn
        if prompt_cache is not None:
            session.use_prompt_cache(prompt_cache)  # CacheFileError: one line
    except ValueError as e:
        fail(str(e))
    if prompt is not None or not sys.stdin.isatty():
        text = require_text(sys.stdin.read() if prompt in (None, "-") else prompt, media)
        try:
            raise typer.Exit(one_shot(session, text, as_json=as_json, assume_yes=yes, media=media))
        except ValueError as e:  # MediaError and other bad input: one line
            fail(str(e))
    console = Console()
    console.print("type /help for commands", style="dim")
    term = Terminal(session, console, assume_yes=yes)
    term.attach(media)
    term.loop()
