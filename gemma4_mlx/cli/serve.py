"""`serve`: the OpenAI / Anthropic-compatible local server."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer

from gemma4_mlx.cli.common import (
    MODEL_HELP,
    Backend,
    Distributed,
    DraftModel,
    DraftTokens,
    Dtype,
    Force,
    KvBits,
    app,
    fail,
    finite,
    load_draft,
    load_or_fail,
    start_ranks,
)


def _check_api_key(value: str | None) -> str | None:
    """An empty key (`--api-key "$KEY"` with KEY unset) would switch authentication off."""
    if value is not None and not value.strip():
        raise typer.BadParameter("empty: give the key clients must send, or leave --api-key out")
    return value


def _check_cors(value: list[str] | None) -> list[str] | None:
    """Origins are checked before minutes of loading (a trailing slash is the usual slip)."""
    from gemma4_mlx.server.origins import Origins  # the server package loads FastAPI: --help stays instant

    try:
        Origins(value or ["local"])
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return value


def check_address(host: str, port: int, api_key: str | None) -> None:
    """One line if the address cannot be listened on; a warning when the server would
    answer anyone on the network without a key."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        fail(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)


def served_names(given: str, chosen: list[str] | None) -> list[str]:
    """The names clients may send as `model`, the listed one first: --served-model-name's,
    else a local folder's own name — with the path as typed also accepted."""
    if chosen:
        if any(not n.strip() for n in chosen):
            raise typer.BadParameter("empty name", param_hint="--served-model-name")
        return list(dict.fromkeys(chosen))
    from gemma4_mlx.checkpoint.hub import hub_repo  # heavy parts load lazily: --help stays instant

    folder = Path(given).expanduser()
    if folder.is_dir():  # a hub cache snapshot is named by its repo id, not its commit hash
        own = hub_repo(folder) or folder.resolve().name
        return list(dict.fromkeys([own, given] if own else [given]))
    return [given]


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=MODEL_HELP + " Default: as `chat` (E2B-it when available, else demo)."),
    ] = None,
    draft_model: DraftModel = "auto",
    draft_tokens: DraftTokens = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", help="Require this key (Authorization: Bearer / x-api-key).", callback=_check_api_key
        ),
    ] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting or running before 429.")] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Requests decoded together.")] = 8,
    prefix_cache_gb: Annotated[
        float,
        typer.Option(
            "--prefix-cache-gb", min=0, callback=finite, help="Memory for finished requests' KV caches (prefix reuse)."
        ),
    ] = 2.0,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            "--kv-cache-gb",
            min=0,
            callback=finite,
            help="Most KV-cache memory of the running batch (default: no limit).",
        ),
    ] = None,
    max_context: Annotated[
        int | None, typer.Option("--max-context", min=1, help="Longest prompt in tokens (default: the model's).")
    ] = None,
    allow_local_files: Annotated[
        bool, typer.Option("--allow-local-files", help="Let image parts name files on this machine.")
    ] = False,
    thinking_tokens: Annotated[
        int | None,
        typer.Option(
            "--thinking-tokens",
            min=0,
            help="Most thinking tokens of a reply; then the thought is closed and the answer follows "
            "(default: no limit; a request's thinking.budget_tokens may ask for fewer).",
        ),
    ] = None,
    default_max_tokens: Annotated[
        int | None,
        typer.Option(
            "--default-max-tokens",
            min=1,
            help="Most tokens of a reply whose request sets no limit (default 4096; Codex sends none); "
            "the context left caps it either way.",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Web pages that may call the server (repeat): an origin such as https://chat.example.com, "
            "a glob such as chrome-extension://*, 'local' (the default: localhost pages and desktop web views), "
            "'*' for any page, 'none' for no CORS.",
            callback=_check_cors,
        ),
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            "--served-model-name",
            help="Name clients send as `model` (repeat for aliases). Default: the folder's name, or the id given.",
        ),
    ] = None,
    dtype: Dtype = None,
    force: Force = False,
    kv_bits: KvBits = 16,
    distributed: Distributed = False,
    backend: Backend = "any",
):
    """Serve the model over HTTP: OpenAI (/v1/chat/completions, /v1/completions) and
    Anthropic (/v1/messages) APIs, /health, /v1/models, /metrics."""
    import uvicorn

    from gemma4_mlx.demo import DEFAULT_REPO, DEFAULT_SHORT, DEMO_MODEL, default_model
    from gemma4_mlx.server import app as server_app
    from gemma4_mlx.server.app import follower

    repo, name = None, model
    if model is None:
        model, banner = default_model()
        repo, name = DEFAULT_REPO, "demo" if model == str(DEMO_MODEL) else DEFAULT_SHORT
        typer.echo(banner, err=True)
    group = start_ranks(distributed, backend)
    leader = group is None or group.rank() == 0
    if leader:  # only rank 0 listens
        check_address(host, port, api_key)  # before minutes of loading
    m, tokenizer, _ = load_or_fail(model, dtype, force=force, group=group)
    drafter, k = load_draft(draft_model, draft_tokens, model, m, dtype, quiet=not leader, repo=repo, group=group)
    settings = dict(
        drafter=drafter,
        draft_tokens=k,
        max_queue=max_queue,
        max_batch=max_batch,
        prefix_cache_gb=prefix_cache_gb,
        kv_cache_gb=kv_cache_gb,
        kv_bits=kv_bits,
    )
    if not leader:  # computes its shard of rank 0's batches until rank 0 shuts down
        follower(m, tokenizer, group=group, **settings)
        return
    names = served_names(name, served_model_name)
    api = server_app(
        m,
        tokenizer,
        model_name=names[0],
        aliases=names[1:],
        api_key=api_key,
        max_context=max_context,
        allow_local_files=allow_local_files,
        thinking_tokens=thinking_tokens,
        cors_origins=cors_origin or ["local"],
        **({} if default_max_tokens is None else {"default_max_tokens": default_max_tokens}),
        group=group,
        **settings,
    )
    shown = " / ".join(map(repr, names))
    typer.echo(f"serving {shown} on http://{host}:{port}/v1 (clients send it as `model`)", err=True)
    uvicorn.run(api, host=host, port=port, log_level="info")
