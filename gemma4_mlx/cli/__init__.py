"""`gemma4-mlx` command line.  Generated text goes to stdout; progress, statistics
and errors go to stderr, so the output composes in shell pipelines.

`common` holds the app and the shared options; each other module registers its
commands on it when imported (in the order `--help` lists them)."""

# isort: off
from gemma4_mlx.cli.common import app
from gemma4_mlx.cli import run  # noqa: F401  generate, chat
from gemma4_mlx.cli import serve  # noqa: F401  serve
from gemma4_mlx.cli import models  # noqa: F401  convert, info, pull, list, rm

# isort: on

__all__ = ["app"]
