"""Checkpoints: `convert`, `info`, `pull`, `list`, `rm`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gemma4_mlx.cli.common import MODEL_HELP, app, fail


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
    mmproj: str | None = typer.Option(
        None, "--mmproj", help="With a GGUF source: the 12B unified model's mmproj GGUF (its vision/audio embedders)."
    ),
):
    """Convert a Hugging Face Gemma 4 checkpoint (text model with its vision/audio towers, or an
    MTP drafter) to an MLX folder."""
    import time

    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.convert import ConvertError, InterruptedAfterPublishing
    from gemma4_mlx.convert import convert as run

    t0 = time.perf_counter()
    try:
        report = run(
            src,
            dst,
            quant,
            force=force,
            keep_high_precision=keep_high_precision,
            progress=sys.stderr.isatty(),
            mmproj=mmproj,
        )
    except (ConvertError, LoadError, InterruptedAfterPublishing) as e:
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
    max_context: int | None = typer.Option(
        None, "--max-context", min=1, help="Context length for the KV cache estimate (default: the model's)."
    ),
):
    """Parameters, bytes and formats per component, memory needed (weights, KV cache for
    --max-context) and available, and resident memory after loading."""
    import json

    from rich.console import Console

    from gemma4_mlx.checkpoint.files import LoadError
    from gemma4_mlx.checkpoint.hub import resolve_path
    from gemma4_mlx.checkpoint.info import model_info, render

    try:
        result = model_info(resolve_path(model), load=not no_load, max_context=max_context)
    except LoadError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        render(result, Console())


# -- model management: pull, list, rm -----------------------------------------------


def human_size(n: int | None) -> str:
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
    from gemma4_mlx.convert import ConvertError, InterruptedAfterPublishing
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
        except InterruptedAfterPublishing as e:
            record_pull(dst, r, folder.name, quant)
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
        rows.append(
            (m.name, m.format, human_size(m.size_bytes), human_size(m.resident_bytes), drafter, m.source or m.kind)
        )
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
        typer.echo(f"remove {plan.what}, {human_size(plan.size_bytes)}? [y/N] ", err=True, nl=False)
        answer = sys.stdin.readline()  # "" at end of input: no
        if not sys.stdin.isatty():
            typer.echo(err=True)  # a piped answer is not echoed: end the prompt's line
        if answer.strip().lower() not in ("y", "yes"):
            fail(f"{name}: not removed")
    plan.run()
    typer.echo(f"removed {plan.what}: {human_size(plan.size_bytes)} freed", err=True)
