"""`gemma4-mlx` command line.  Generated text goes to stdout; progress, statistics
and errors go to stderr, so the output composes in shell pipelines.

`common` holds the app and the shared options; each other module registers its
commands on it when imported (in the order `--help` lists them)."""

import os
import sys

# isort: off
from gemma4_mlx import ranks
from gemma4_mlx.cli.common import app
from gemma4_mlx.cli import run  # noqa: F401  generate, chat
from gemma4_mlx.cli import serve  # noqa: F401  serve
from gemma4_mlx.cli import models  # noqa: F401  convert, info, pull, list, rm
from gemma4_mlx.cli import cache  # noqa: F401  cache-prompt

# isort: on


def main() -> None:
    """The `gemma4-mlx` entry point: the app, and one line (not a traceback) when
    another rank of a --distributed run died or its link dropped."""
    try:
        app()
    except RuntimeError as e:
        if not ranks.lost_peer(e):
            raise
        rank = next((os.environ[k] for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if k in os.environ), "?")
        # on a line of its own: MLX's notes about the broken link may have left one open
        print(f"\nerror: rank {rank}: lost the connection to another rank ({e}); stopping", file=sys.stderr)
        sys.exit(1)


__all__ = ["app", "main"]
